"""Fixtures: a tiny byte-level BPE tokenizer, tiny GPT-NeoX models, and chat data files.

- ``tokenizer_dir``: our GPT-NeoX-layout tokenizer (``train_bpe_tokenizer``) trained on the
  test conversations: ``<|endoftext|>`` id 0, ``<|padding|>`` id 1, no chat template.
- ``base_model_dir``: a randomly initialised 2-layer GPTNeoXForCausalLM with that
  tokenizer and no chat template, its vocabulary padded past the tokenizer (as a
  Megatron export is), so adding the chat tokens needs no new rows.
- ``sft_file`` / ``dpo_file``: JSONL files of a few short conversations / preference pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("How many legs has a cat?", "A cat has four legs."),
    ("What do bees make?", "Bees make honey."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
    ("What colour is snow?", "Snow is white."),
    ("How many legs has a bird?", "A bird has two legs."),
]
SYSTEM = "You are a helpful assistant."
# preference pairs: the chosen answer is polite, the rejected one rude
PAIRS = [(q, a, "No. Go away.") for q, a in QA]


def sft_rows():
    rows = []
    for i, (q, a) in enumerate(QA):
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 2 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({"messages": messages, "id": i})
    return rows


def dpo_rows():
    return [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in PAIRS]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _corpus():
    lines = [SYSTEM, "No. Go away."]
    for q, a in QA:
        lines += [q, a, f"user\n{q}", f"assistant\n{a}", "system\n" + SYSTEM]
    return lines * 20


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from megatron_sfm.data_tools.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(_corpus(), 400, tmp_path_factory.mktemp("tok"), min_frequency=2)


def make_model(vocab_rows: int, seed: int = 0):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab_rows, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0,
    )
    return GPTNeoXForCausalLM(cfg)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = -(-(len(tok) + 2) // 16) * 16  # padded past the tokenizer, with room for the two chat tokens
    out = tmp_path_factory.mktemp("base_model")
    make_model(rows).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def sft_file(data_dir):
    return write_jsonl(data_dir / "sft.jsonl", sft_rows())


@pytest.fixture(scope="session")
def dpo_file(data_dir):
    return write_jsonl(data_dir / "dpo.jsonl", dpo_rows())


TINY = Path(__file__).resolve().parents[2] / "examples/posttrain/tiny.yaml"


def tiny_config(kind: str, model, out, data, *overrides: str):
    from megatron_sfm.posttrain import load_stage_config

    return load_stage_config(kind, TINY, list(overrides), model=str(model), out=str(out),
                             data=[str(d) for d in data])


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, base_model_dir, sft_file):
    """``sfm posttrain sft`` on the base model: the tiny config's 12 steps, uninterrupted."""
    from megatron_sfm.posttrain import run_sft

    out = tmp_path_factory.mktemp("sft") / "out"
    return run_sft(tiny_config("sft", base_model_dir, out, [sft_file]), progress=False)


def response_logprob(model, tokenizer, prompt, response) -> float:
    """Sum of log p(response tokens | prompt) under the chat template (prompt, response: messages)."""
    import torch

    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    assert full_text.startswith(prompt_text)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])
    token_logp = logp[torch.arange(len(targets)), targets]
    return float(token_logp[len(prompt_ids) - 1:].sum())
