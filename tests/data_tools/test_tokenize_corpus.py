"""Tokenizing shards into Megatron indexed datasets: bytes, read-back, workers, errors."""

from __future__ import annotations

import gzip
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from data_tools_helpers import write_jsonl
from megatron_sfm.data_tools.tokenize_corpus import tokenize_to_indexed

from megatron_sfm.errors import SfmError


def _reference_preprocess_data(jsonl: Path, tokenizer_path: Path, prefix: Path, library: str = "huggingface") -> None:
    """Megatron-LM tools/preprocess_data.py (core_v0.16.1), document level with --append-eod,
    redone here: Megatron-Core's own tokenizer (``tokenize`` and ``eod``; HuggingFace or
    sentencepiece library), the dtype from ``DType.optimal_dtype(vocab_size)``, and
    ``add_document`` per JSON line. (benchmarks/bench_tokenize.py also runs the real script.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
        from megatron.core.tokenizers import MegatronTokenizer

    tok = MegatronTokenizer.from_pretrained(tokenizer_path=str(tokenizer_path), metadata_path={"library": library})
    builder = indexed_dataset.IndexedDatasetBuilder(
        str(prefix) + ".bin", dtype=indexed_dataset.DType.optimal_dtype(tok.vocab_size)
    )
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = list(tok.tokenize(json.loads(line)["text"]))
            lens = []
            if ids:
                ids.append(tok.eod)
                lens = [len(ids)]
            builder.add_document(ids, lens)
    builder.finalize(str(prefix) + ".idx")


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory, corpus_texts):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    write_jsonl(path, [{"id": i, "text": t, "extra": [i]} for i, t in enumerate(corpus_texts)])
    return path


def _same_files(a: str, b: str) -> bool:
    return all(Path(a + s).read_bytes() == Path(b + s).read_bytes() for s in (".bin", ".idx"))


def test_byte_identical_to_megatron_preprocess_data(tmp_path, corpus_jsonl, bpe_dir):
    ref = tmp_path / "ref"
    _reference_preprocess_data(corpus_jsonl, bpe_dir, ref)
    for backend in ("gigatoken", "tokenizers"):
        out = tmp_path / f"ours_{backend}"
        summary = tokenize_to_indexed([corpus_jsonl], bpe_dir, out, backend=backend, progress=False)
        assert summary["backend"] == backend
        assert _same_files(str(out), str(ref)), backend
    assert summary["empty_documents"] == 1
    assert summary["dtype"] == "uint16"


def test_read_back_through_megatron_indexed_dataset(tmp_path, corpus_jsonl, corpus_texts, bpe_dir):
    from megatron_sfm.data_tools.tokenizer import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = tmp_path / "ds"
    tokenize_to_indexed([corpus_jsonl], bpe_dir, prefix, progress=False)
    tok = load_tokenizer(bpe_dir)
    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) - 1 == len(corpus_texts)
    # every non-empty document is one sequence ending in EOD, and decodes to its text
    seq = 0
    for i, text in enumerate(corpus_texts):
        a, b = ds.document_indices[i], ds.document_indices[i + 1]
        if not text:
            assert a == b
            continue
        assert b - a == 1
        ids = ds[seq].tolist()
        seq += 1
        assert ids[-1] == tok.eod_id
        assert tok.decode(ids[:-1]) == text
    assert seq == len(ds)
    # our numpy reader agrees with Megatron's
    from megatron_sfm.data_tools.indexed import read_index

    mine = read_index(prefix)
    assert np.array_equal(mine.sequence_lengths, ds.sequence_lengths)
    assert np.array_equal(mine.document_indices, ds.document_indices)
    assert np.array_equal(mine.sequence(7), ds[7])


def test_one_and_three_workers_give_identical_files(tmp_path, corpus_jsonl, bpe_dir):
    one, three = tmp_path / "w1", tmp_path / "w3"
    s1 = tokenize_to_indexed([corpus_jsonl], bpe_dir, one, workers=1, chunk_bytes=8 << 10, progress=False)
    s3 = tokenize_to_indexed([corpus_jsonl], bpe_dir, three, workers=3, chunk_bytes=8 << 10, progress=False)
    assert s1["tokens"] == s3["tokens"] and s1["documents"] == s3["documents"]
    assert _same_files(str(one), str(three))
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporaries left
        "w1.bin", "w1.idx", "w1.stats.json", "w3.bin", "w3.idx", "w3.stats.json"]
    assert Path(str(one) + ".stats.json").read_bytes() == Path(str(three) + ".stats.json").read_bytes()


def test_compressed_and_parquet_inputs_match_jsonl(tmp_path, corpus_texts, bpe_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [{"text": t} for t in corpus_texts[:400]]
    write_jsonl(tmp_path / "x.jsonl", docs)
    raw = (tmp_path / "x.jsonl").read_bytes()
    with gzip.open(tmp_path / "x.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "x.parquet")
    tokenize_to_indexed([tmp_path / "x.jsonl"], bpe_dir, tmp_path / "ref", progress=False)
    for name in ("x.jsonl.gz", "x.jsonl.zst", "x.parquet"):
        tokenize_to_indexed([tmp_path / name], bpe_dir, tmp_path / "o", chunk_bytes=4 << 10, workers=2, progress=False)
        assert _same_files(str(tmp_path / "o"), str(tmp_path / "ref")), name


def test_several_inputs_keep_their_order(tmp_path, corpus_texts, bpe_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus_texts[:300]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in corpus_texts[300:600]])
    write_jsonl(tmp_path / "ab.jsonl", [{"text": t} for t in corpus_texts[:600]])
    tokenize_to_indexed([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], bpe_dir, tmp_path / "two", workers=2, progress=False)
    tokenize_to_indexed([tmp_path / "ab.jsonl"], bpe_dir, tmp_path / "one", progress=False)
    assert _same_files(str(tmp_path / "two"), str(tmp_path / "one"))


def test_corrupt_line_error_and_skip(tmp_path, corpus_texts, bpe_dir):
    lines = [json.dumps({"text": t}) for t in corpus_texts[:50]]
    lines[36] = '{"text": "unterminated'
    lines[41] = '{"body": "no text key"}'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "out"
    with pytest.raises(SfmError, match=r"bad.jsonl:37: invalid JSON"):
        tokenize_to_indexed([tmp_path / "bad.jsonl"], bpe_dir, prefix, workers=2, chunk_bytes=1 << 10, progress=False)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))  # nothing left behind
    summary = tokenize_to_indexed([tmp_path / "bad.jsonl"], bpe_dir, prefix, skip_bad_lines=True, progress=False)
    assert summary["bad_lines"] == 2 and summary["documents"] == 48
    assert summary["bad_line_examples"] == [f"{tmp_path / 'bad.jsonl'}:37", f"{tmp_path / 'bad.jsonl'}:42"]
    for bad_line, message in [("[1, 2]", "expected a JSON object, got list"), ('{"text": 5}', "key 'text' is int, not a string"),
                              ('{"body": "x"}', "no key 'text'"), (b"\xff\xfe".decode("latin-1"), "invalid JSON")]:
        (tmp_path / "bad2.jsonl").write_text("\n".join(lines[:10] + [bad_line]) + "\n", encoding="latin-1" if "\xff" in bad_line else "utf-8")
        with pytest.raises(SfmError, match=rf"bad2.jsonl:11: {re.escape(message)}"):
            tokenize_to_indexed([tmp_path / "bad2.jsonl"], bpe_dir, tmp_path / "b2", progress=False)
    good = [json.loads(l) for i, l in enumerate(lines) if i not in (36, 41)]
    write_jsonl(tmp_path / "good.jsonl", good)
    tokenize_to_indexed([tmp_path / "good.jsonl"], bpe_dir, tmp_path / "good", progress=False)
    assert _same_files(str(prefix), str(tmp_path / "good"))


def test_interrupted_run_leaves_no_complete_looking_files(tmp_path, corpus_texts, bpe_dir, monkeypatch):
    from megatron_sfm.data_tools import tokenize_corpus

    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_texts])
    prefix = tmp_path / "ds"
    # an older complete pair exists under the same prefix
    tokenize_to_indexed([tmp_path / "in.jsonl"], bpe_dir, prefix, progress=False)
    real = tokenize_corpus.encode_chunk
    calls = {"n": 0}

    def dying(chunk, out=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(chunk, out)

    monkeypatch.setattr(tokenize_corpus, "encode_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        tokenize_to_indexed([tmp_path / "in.jsonl"], bpe_dir, prefix, chunk_bytes=4 << 10, progress=False)
    assert calls["n"] == 3
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ds"))
    assert leftovers == []
    # the old pair is untouched (a run that did not finish never replaced it)
    from megatron_sfm.data_tools.indexed import read_index

    assert read_index(prefix).num_documents == len(corpus_texts)


def test_sentencepiece_byte_identical_to_megatron(tmp_path, corpus_texts, sp_dir):
    write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in corpus_texts[:300]])
    _reference_preprocess_data(tmp_path / "s.jsonl", sp_dir / "tokenizer.model", tmp_path / "ref", library="sentencepiece")
    tokenize_to_indexed([tmp_path / "s.jsonl"], sp_dir, tmp_path / "ours", workers=2, progress=False)
    assert _same_files(str(tmp_path / "ours"), str(tmp_path / "ref"))


def test_sentencepiece_model(tmp_path, corpus_texts, sp_dir):
    from megatron_sfm.data_tools.indexed import read_index
    from megatron_sfm.data_tools.tokenizer import load_tokenizer

    texts = [t for t in corpus_texts[:200] if t]
    write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in texts])
    summary = tokenize_to_indexed([tmp_path / "s.jsonl"], sp_dir / "tokenizer.model", tmp_path / "sp", workers=2, progress=False)
    tok = load_tokenizer(sp_dir)
    assert summary["eod_id"] == tok.eod_id == 2
    data = read_index(tmp_path / "sp")
    for i in (0, 5, 50):
        ids = data.document(i).tolist()
        assert ids[-1] == 2 and ids[:-1] == tok.encode(texts[i])


def test_int32_dtype_for_large_vocabularies(tmp_path, corpus_texts):
    from megatron_sfm.data_tools.indexed import optimal_dtype, read_index
    from megatron_sfm.data_tools.tokenizer import train_bpe_tokenizer

    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32
    # a tokenizer whose added tokens push the vocabulary past 65500 ids
    from tokenizers import Tokenizer

    d = train_bpe_tokenizer(corpus_texts[:200], 300, tmp_path / "tok")
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.add_special_tokens([f"<extra_{i}>" for i in range(65500)])
    tk.save(str(d / "tokenizer.json"))
    write_jsonl(tmp_path / "s.jsonl", [{"text": "hello <extra_65000> world"}])
    s = tokenize_to_indexed([tmp_path / "s.jsonl"], d, tmp_path / "big", progress=False)
    assert s["dtype"] == "int32"
    ids = read_index(tmp_path / "big").document(0).tolist()
    assert tk.token_to_id("<extra_65000>") in ids and ids[-1] == 0


def test_inspect(tmp_path, corpus_jsonl, corpus_texts, bpe_dir):
    from megatron_sfm.data_tools.inspect_dataset import inspect_indexed

    tokenize_to_indexed([corpus_jsonl], bpe_dir, tmp_path / "ds", progress=False)
    info = inspect_indexed(tmp_path / "ds", bpe_dir)
    assert info["documents"] == len(corpus_texts)
    assert info["empty_documents"] == 1
    assert info["sequences"] == len(corpus_texts) - 1
    assert info["first_document"] == corpus_texts[0][:500] + (" ..." if len(corpus_texts[0]) > 500 else "")
    assert info["ends_with_eod"] is True
    assert info["max_token_id"] < info["tokenizer_vocab_size"]


def test_numpy_index_writer_equals_megatron_builder(tmp_path):
    """indexed.IndexWriter (--writer numpy) == IndexedDatasetBuilder.add_document + finalize."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset

    from megatron_sfm.data_tools.indexed import IndexWriter

    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int32):
        for n_docs in (0, 1, 257):
            lengths = rng.integers(0, 40, n_docs)
            lengths[: n_docs // 5] = 0  # documents with no tokens get no sequence
            rng.shuffle(lengths)
            tokens = rng.integers(0, 60000, int(lengths.sum())).astype(dtype)
            ref = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
            offset = 0
            for n in lengths:
                ref.add_document(tokens[offset : offset + n].tolist(), [int(n)] if n else [])
                offset += n
            ref.finalize(str(tmp_path / "ref.idx"))
            ours = IndexWriter(tmp_path / "ours.bin", dtype)
            cut = n_docs // 3
            ours.add_documents(tokens[: lengths[:cut].sum()], lengths[:cut])  # in two pieces
            ours.add_documents(tokens[lengths[:cut].sum() :], lengths[cut:])
            ours.finalize(tmp_path / "ours.idx")
            assert _same_files(str(tmp_path / "ours"), str(tmp_path / "ref")), (dtype, n_docs)


def test_megatron_writer_gives_the_same_files(tmp_path, corpus_jsonl, bpe_dir):
    a = tokenize_to_indexed([corpus_jsonl], bpe_dir, tmp_path / "np", workers=2, chunk_bytes=16 << 10, progress=False)
    b = tokenize_to_indexed([corpus_jsonl], bpe_dir, tmp_path / "mc", progress=False, writer="megatron")
    assert (a["writer"], b["writer"]) == ("numpy", "megatron")
    assert _same_files(str(tmp_path / "np"), str(tmp_path / "mc"))
    with pytest.raises(SfmError, match="unknown writer"):
        tokenize_to_indexed([corpus_jsonl], bpe_dir, tmp_path / "x", writer="arrow", progress=False)


def test_cli_tokenize_default_path_imports_nothing_heavy(tmp_path, corpus_jsonl, bpe_dir):
    """The default `sfm data tokenize` (numpy writer) never imports Megatron-Core or torch,
    nor awkward (and the pyarrow it pulls in) or a second copy of the tokenizer in
    `tokenizers`: checked in the parent and, through a spy, in the worker processes."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "HEAVY = ['torch', 'megatron', 'awkward', 'pyarrow', 'tokenizers']\n"
        "from megatron_sfm.data_tools import tokenize_corpus\n"
        "real = tokenize_corpus.encode_chunk\n"
        "def spy(chunk, out=None):\n"
        "    enc = real(chunk, out)\n"
        "    loaded = [m for m in HEAVY if m in sys.modules]\n"
        "    if loaded:\n"
        "        raise RuntimeError(f'worker imported {loaded}')\n"
        "    return enc\n"
        "tokenize_corpus.encode_chunk = spy\n"
        "from megatron_sfm.cli import main\n"
        f"rc = main(['data', 'tokenize', {str(corpus_jsonl)!r}, '--tokenizer', {str(bpe_dir)!r}, "
        f"'--out', {str(tmp_path / 'ds')!r}, '--workers', '2', '--no-progress', '--chunk-mb', '0.05'])\n"
        "assert rc == 0, rc\n"
        "print('parent', [m for m in HEAVY if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "parent []"
    ref = tmp_path / "ref"
    tokenize_to_indexed([corpus_jsonl], bpe_dir, ref, writer="megatron", progress=False)
    assert _same_files(str(tmp_path / "ds"), str(ref))


def test_lines_only_python_json_accepts_are_tokenized_as_before(tmp_path, bpe_dir):
    """orjson parses the lines; what it refuses but json accepts (NaN, a BOM, big numbers,
    an escaped lone surrogate outside the text) is still read, as json.loads read it."""
    lines = [b'{"text": "plain one"}', b'{"text": "with nan", "score": NaN}', b'\xef\xbb\xbf{"text": "bom line"}',
             b'{"text": "big", "n": 123456789012345678901234567890}', b'{"text": "x", "s": "\\udc80"}',
             b'{"text": "caf\\u00e9 \\ud83d\\ude00"}']
    (tmp_path / "odd.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    texts = ["plain one", "with nan", "bom line", "big", "x", "caf\u00e9 \U0001F600"]
    write_jsonl(tmp_path / "clean.jsonl", [{"text": t} for t in texts])
    s = tokenize_to_indexed([tmp_path / "odd.jsonl"], bpe_dir, tmp_path / "odd", workers=2, progress=False)
    tokenize_to_indexed([tmp_path / "clean.jsonl"], bpe_dir, tmp_path / "clean", progress=False)
    assert s["documents"] == len(texts) and s["bad_lines"] == 0
    assert _same_files(str(tmp_path / "odd"), str(tmp_path / "clean"))


@pytest.fixture(scope="module")
def int32_tok_dir(tmp_path_factory, corpus_texts):
    """A tokenizer whose added tokens push the vocabulary past 65500 ids (int32 tokens)."""
    from tokenizers import Tokenizer

    from megatron_sfm.data_tools.tokenizer import train_bpe_tokenizer

    d = train_bpe_tokenizer(corpus_texts[:200], 300, tmp_path_factory.mktemp("tok32"))
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.add_special_tokens([f"<extra_{i}>" for i in range(65500)])
    tk.save(str(d / "tokenizer.json"))
    return d


def _builder_reference(texts: list[str], tok_dir, prefix) -> str:
    """One ``IndexedDatasetBuilder.add_document`` per document (ids from Hugging Face
    ``tokenizers`` + EOD; none for a document without tokens), then ``finalize``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset

    from megatron_sfm.data_tools.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir, backend="tokenizers")
    builder = indexed_dataset.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=indexed_dataset.DType.optimal_dtype(tok.vocab_size))
    for text in texts:
        ids = tok.encode(text)
        builder.add_document(ids + [tok.eod_id] if ids else [], [len(ids) + 1] if ids else [])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def test_default_writer_equals_megatron_builder_on_varied_inputs(tmp_path, corpus_texts, bpe_dir, int32_tok_dir):
    """Many files (an empty one, one of only empty documents, gzip, one document), empty
    documents, uint16 and int32 vocabularies: the default path writes exactly what
    Megatron-Core's IndexedDatasetBuilder writes, with 1 and 2 workers."""
    texts = corpus_texts[:400] + ["<extra_7> literal added token", "", "x"]
    files, all_texts = [], []
    pieces = [texts[:1], [], ["", "", ""], texts[1:90], texts[90:200], texts[200:201], texts[201:]]
    pieces += [texts[i : i + 7] for i in range(0, 60, 7)]  # many small files
    for i, part in enumerate(pieces):
        path = tmp_path / f"in{i:02d}.jsonl"
        write_jsonl(path, [{"text": t} for t in part])
        if i == 4:
            with gzip.open(tmp_path / f"in{i:02d}.jsonl.gz", "wb") as f:
                f.write(path.read_bytes())
            path.unlink()
            path = tmp_path / f"in{i:02d}.jsonl.gz"
        files.append(path)
        all_texts += part
    assert len(files) > 12 and files[1].stat().st_size == 0
    for tok_dir, dtype in ((bpe_dir, "uint16"), (int32_tok_dir, "int32")):
        ref = _builder_reference(all_texts, tok_dir, tmp_path / f"ref_{dtype}")
        for workers in (1, 2):
            out = tmp_path / f"ours_{dtype}_{workers}"
            s = tokenize_to_indexed(files, tok_dir, out, workers=workers, chunk_bytes=2 << 10, progress=False)
            assert (s["writer"], s["dtype"], s["documents"]) == ("numpy", dtype, len(all_texts))
            assert _same_files(str(out), ref), (dtype, workers)


def test_stats_sidecar(tmp_path, corpus_jsonl, corpus_texts, bpe_dir, int32_tok_dir):
    from megatron_sfm.data_tools.indexed import read_index

    prefix = tmp_path / "ds"
    summary = tokenize_to_indexed([corpus_jsonl], bpe_dir, prefix, workers=2, chunk_bytes=8 << 10, progress=False)
    stats = json.loads(Path(str(prefix) + ".stats.json").read_text())
    data = read_index(prefix)
    assert data.num_documents == len(corpus_texts)
    assert stats == {
        "num_documents": len(corpus_texts),
        "num_sequences": data.num_sequences,
        "num_tokens": data.num_tokens,
        "max_token_id": int(data.tokens.max()),
        "dtype": "uint16",
        "vocab_size": summary["vocab_size"],
        "eod_id": 0,
        "append_eod": True,
        "tokenizer": str((bpe_dir / "tokenizer.json").resolve()),
        "empty_documents": 1,
    }
    assert summary["max_token_id"] == stats["max_token_id"] < stats["vocab_size"]
    # int32 vocabulary, an added token with a large id, no EOD appended
    write_jsonl(tmp_path / "big.jsonl", [{"text": "a <extra_65000> b"}, {"text": ""}])
    tokenize_to_indexed([tmp_path / "big.jsonl"], int32_tok_dir, tmp_path / "big", append_eod=False, progress=False)
    big = json.loads((tmp_path / "big.stats.json").read_text())
    ids = read_index(tmp_path / "big").tokens.tolist()
    assert (big["dtype"], big["max_token_id"], big["num_tokens"], big["append_eod"]) == ("int32", max(ids), len(ids), False)
    assert big["vocab_size"] > 65500 and big["num_documents"] == 2 and big["num_sequences"] == 1
    # no tokens at all: max_token_id is -1
    write_jsonl(tmp_path / "none.jsonl", [{"text": ""}])
    tokenize_to_indexed([tmp_path / "none.jsonl"], bpe_dir, tmp_path / "none", progress=False)
    none = json.loads((tmp_path / "none.stats.json").read_text())
    assert (none["max_token_id"], none["num_tokens"], none["num_documents"]) == (-1, 0, 1)


def test_out_prefix_that_cannot_be_written_is_one_line_error(tmp_path, corpus_jsonl, bpe_dir, capsys):
    from megatron_sfm.cli import main

    (tmp_path / "afile").write_text("x")
    cases = [
        (str(tmp_path / "afile" / "sub" / "ds"),
         f"error: --out {tmp_path}/afile/sub/ds: cannot create the folder {tmp_path}/afile/sub (Not a directory)"),
        (str(tmp_path / "folder") + "/",
         f"error: --out '{tmp_path}/folder/': give a file prefix (writes PREFIX.bin, PREFIX.idx), not a folder"),
    ]
    for out, message in cases:
        rc = main(["data", "tokenize", str(corpus_jsonl), "--tokenizer", str(bpe_dir), "--out", out, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err == message + "\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_damaged_compressed_input_is_one_line_error(tmp_path, corpus_texts, bpe_dir):
    import zstandard

    write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in corpus_texts[:300]])
    raw = (tmp_path / "x.jsonl").read_bytes()
    gz = gzip.compress(raw)
    zst = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    (tmp_path / "x.jsonl").unlink()
    for name, data in (("cut.jsonl.gz", gz[: len(gz) - 40]), ("cut.jsonl.zst", zst[: len(zst) - 40])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SfmError, match=rf"{re.escape(name)}: damaged") as info:
            tokenize_to_indexed([tmp_path / name], bpe_dir, tmp_path / "out", workers=2, chunk_bytes=4 << 10, progress=False)
        assert "\n" not in str(info.value)
        (tmp_path / name).unlink()
    assert list(tmp_path.iterdir()) == []  # nothing written


# ----------------------------------------------------------------------------- worker pool


def _no_children_left() -> bool:
    import multiprocessing

    return multiprocessing.active_children() == []


def test_chunks_too_big_for_a_slot_come_back_through_the_pipe(tmp_path, corpus_texts, bpe_dir, monkeypatch):
    """A chunk whose tokens do not fit the shared-memory slot (here: no margin and 64-byte
    chunks, so every long line overflows) is sent back through the pipe; files unchanged."""
    from megatron_sfm.data_tools import tokenize_corpus

    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_texts[:300]])
    tokenize_to_indexed([tmp_path / "in.jsonl"], bpe_dir, tmp_path / "ref", progress=False)
    sent: list[bool] = []  # per chunk: did its tokens come back through the pipe?
    monkeypatch.setattr(tokenize_corpus, "_SLOT_MARGIN_TOKENS", 0)
    from megatron_sfm.data_tools import tokenize_pool

    real_imap = tokenize_pool.SlotPool.imap

    def spying_imap(self, tasks):
        for task, result, data in real_imap(self, tasks):
            sent.append(data is None and result[1].tokens.size > 0)
            yield task, result, data

    monkeypatch.setattr(tokenize_pool.SlotPool, "imap", spying_imap)
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        tokenize_to_indexed([tmp_path / "in.jsonl"], bpe_dir, out, workers=workers, chunk_bytes=64, progress=False)
        assert _same_files(str(out), str(tmp_path / "ref")), workers
    assert any(sent) and not all(sent)  # both ways were taken with 2 workers
    assert _no_children_left()


def test_worker_exception_is_raised_in_the_parent_and_nothing_is_left(tmp_path, corpus_texts, bpe_dir, monkeypatch):
    from megatron_sfm.data_tools import tokenize_corpus

    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_texts])
    real = tokenize_corpus.encode_chunk

    def failing(chunk, out=None):
        if chunk.offset > 0:
            raise ValueError(f"boom at {chunk.offset}")
        return real(chunk, out)

    monkeypatch.setattr(tokenize_corpus, "encode_chunk", failing)
    with pytest.raises(ValueError, match="boom at"):
        tokenize_to_indexed([tmp_path / "in.jsonl"], bpe_dir, tmp_path / "ds", workers=2, chunk_bytes=4 << 10,
                            progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert _no_children_left()


def test_worker_that_dies_is_a_one_line_error(tmp_path, corpus_texts, bpe_dir, monkeypatch):
    import os

    from megatron_sfm.data_tools import tokenize_corpus

    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_texts])
    real = tokenize_corpus.encode_chunk

    def dying(chunk, out=None):
        if chunk.offset > 0:
            os._exit(9)  # as if killed (out of memory)
        return real(chunk, out)

    monkeypatch.setattr(tokenize_corpus, "encode_chunk", dying)
    with pytest.raises(SfmError, match=r"tokenize worker \d died \(exit code 9\)") as info:
        tokenize_to_indexed([tmp_path / "in.jsonl"], bpe_dir, tmp_path / "ds", workers=2, chunk_bytes=4 << 10,
                            progress=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert _no_children_left()


def test_interrupt_in_the_parent_stops_the_workers(tmp_path, corpus_texts, bpe_dir, monkeypatch):
    from megatron_sfm.data_tools import tokenize_corpus

    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_texts])
    calls = {"n": 0}
    real = tokenize_corpus._TokenizeProgress.advance

    def interrupted(self, nbytes, ndocs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, nbytes, ndocs)

    monkeypatch.setattr(tokenize_corpus._TokenizeProgress, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize_to_indexed([tmp_path / "in.jsonl"], bpe_dir, tmp_path / "ds", workers=2, chunk_bytes=4 << 10,
                            progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert _no_children_left()


def test_tokenizer_error_after_the_fork_stops_the_workers(tmp_path, corpus_jsonl, bpe_dir):
    """With several workers the vocabulary is read after the fork (defer_vocab): its errors
    are the same one-line errors, and the workers are gone."""
    with pytest.raises(SfmError, match="is not in the vocabulary"):
        tokenize_to_indexed([corpus_jsonl], bpe_dir, tmp_path / "ds", workers=2, eod_token="<nosuch>", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert _no_children_left()
