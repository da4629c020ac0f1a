"""Tokenizer training and loading: GPT-NeoX layout, backends agree, sentencepiece, errors."""

from __future__ import annotations

import json

import numpy as np

import pytest
from data_tools_helpers import make_texts
from megatron_sfm.data_tools.tokenizer import load_tokenizer, train_bpe_tokenizer

from megatron_sfm.errors import SfmError


def test_bpe_has_the_gpt_neox_layout(bpe_dir):
    spec = json.loads((bpe_dir / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE"
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    assert added == {"<|endoftext|>": 0, "<|padding|>": 1}
    tok = load_tokenizer(bpe_dir)
    assert (tok.eod_id, tok.pad_id, tok.kind) == (0, 1, "huggingface")
    assert tok.vocab_size == len(spec["model"]["vocab"])


def test_backends_agree_and_round_trip(bpe_dir, corpus_texts):
    fast = load_tokenizer(bpe_dir)
    slow = load_tokenizer(bpe_dir, backend="tokenizers")
    assert (fast.backend, slow.backend) == ("gigatoken", "tokenizers")
    unseen = ["", " ", "  two spaces", "tab\there", "ÆØÅ ünïcödé ✓ 𝔘", "x<|endoftext|>y", "\n\n\n", "a" * 3000]
    texts = corpus_texts[:300] + unseen
    for t in texts:
        ids = fast.encode(t)
        assert ids == slow.encode(t), t
        assert fast.decode(ids) == t
    assert fast.encode("x<|endoftext|>y")[1] == 0  # a literal special token maps to its id
    f1, l1 = fast.encode_batch(texts)
    f2, l2 = slow.encode_batch(texts)
    assert f1.tolist() == f2.tolist() and l1.tolist() == l2.tolist()
    assert sum(l1.tolist()) == sum(len(fast.encode(t)) for t in texts)


def test_transformers_loads_the_folder(bpe_dir, corpus_texts):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    tok = load_tokenizer(bpe_dir)
    assert hf.eos_token_id == tok.eod_id and hf.pad_token_id == tok.pad_id and len(hf) == tok.vocab_size
    for t in corpus_texts[:50]:
        assert hf.encode(t, add_special_tokens=False) == tok.encode(t)


def test_train_from_files(tmp_path):
    texts = make_texts(300, seed=5)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    out = train_bpe_tokenizer([tmp_path / "a.jsonl"], 400, tmp_path / "tok", text_key="body")
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.decode(tok.encode(texts[3])) == texts[3]
    assert 300 < tok.vocab_size <= 400


def test_sentencepiece_round_trip(sp_dir, corpus_texts):
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    assert (tok.kind, tok.eod_id, tok.pad_id) == ("sentencepiece", 2, 3)
    for t in corpus_texts[:100]:
        assert tok.decode(tok.encode(t)) == t
    flat, _ = tok.encode_batch(corpus_texts[:20])
    assert flat.tolist() == [i for t in corpus_texts[:20] for i in tok.encode(t)]


def test_load_errors(tmp_path, bpe_dir):
    with pytest.raises(SfmError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(SfmError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SfmError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(SfmError, match="not in the vocabulary"):
        load_tokenizer(bpe_dir, eod_token="<nosuch>")
    with pytest.raises(SfmError, match="too small"):
        train_bpe_tokenizer(["x"], 100, tmp_path / "t")


def test_gigatoken_load_reads_the_vocabulary_as_tokenizers_does(tmp_path, bpe_dir, corpus_texts):
    """With gigatoken, vocab size and special ids come from the JSON without loading
    `tokenizers` (loaded later only for decode/token_to_id); they equal what `tokenizers`
    gives, and a file where the two could differ is left to `tokenizers`."""
    import shutil

    from tokenizers import Tokenizer

    def check(folder, **kw):
        fast, slow = load_tokenizer(folder, **kw), load_tokenizer(folder, backend="tokenizers", **kw)
        assert fast.backend == "gigatoken"
        assert (fast.vocab_size, fast.eod_id, fast.pad_id) == (slow.vocab_size, slow.eod_id, slow.pad_id)
        assert fast.vocab_size == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        return fast

    tok = check(bpe_dir)
    flat, lengths = tok.encode_batch(corpus_texts[:50], parallel=False)
    assert tok._hf_tok is None  # loading and batch-encoding did not load `tokenizers`
    f2, l2 = tok.encode_batch(corpus_texts[:50], parallel=True)
    assert flat.tolist() == f2.tolist() and lengths.tolist() == l2.tolist() and flat.dtype == np.uint32
    assert tok.decode(flat[: lengths[0]]) == corpus_texts[0]

    # eos named in tokenizer_config.json (a model token, not an added one), and added tokens
    d = tmp_path / "cfg"
    shutil.copytree(bpe_dir, d)
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.add_special_tokens(["<eos>", "<pad>", "<extra>"])
    tk.save(str(d / "tokenizer.json"))
    model_token = next(t for t in json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] if len(t) > 3)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": model_token, "pad_token": {"content": "<pad>"}}))
    tok = check(d)
    assert tok.eod_id == tk.token_to_id(model_token) and tok.pad_id == tk.token_to_id("<pad>")
    assert check(d, eod_token="<extra>").eod_id == tk.token_to_id("<extra>")

    # an added token that reuses a model token's string under another id: `tokenizers` decides
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": spec["added_tokens"][-1]["id"] + 1, "content": model_token})
    (d / "tokenizer.json").write_text(json.dumps(spec))
    from megatron_sfm.data_tools.tokenizer import _vocab_from_json

    assert _vocab_from_json(d / "tokenizer.json") is None
