"""The demo's post-training data and measurements, without running the demo:

- the bundled chat and preference sets are this repository's generator output, in the
  propensity prompts' shape, balanced, about everyday things only, with a disjoint
  held-out part, and readable by ``megatron_sfm.posttrain``;
- :func:`dpo_margin` and :func:`sequence_logprobs` agree with float64 references.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from megatron_sfm.demo import posttrain_data as pd
from megatron_sfm.demo.posttrain import dpo_margin, response_ids, sequence_logprobs
from megatron_sfm.evaluation.formats import GENERATE_INSTRUCTION, PERSONAS, TEMPLATES, Format


@pytest.fixture(scope="module")
def bundled():
    return {name: pd.load_records(name) for name in pd.FILES}


def _mc(records, key="messages"):
    return [r for r in records if r["kind"] == "multiple-choice"]


def test_bundled_files_are_the_generators_output(tmp_path):
    counts = pd.write_all(tmp_path)
    for name in pd.FILES:
        assert (tmp_path / name).read_bytes() == (pd.resource_dir() / name).read_bytes(), (
            f"{name} is stale: run python -m megatron_sfm.demo.posttrain_data")
    assert counts[pd.SFT_FILE] >= 300 and counts[pd.DPO_TRAIN_FILE] >= 200 and counts[pd.DPO_HELDOUT_FILE] >= 50


def _interrupt_after(calls: int):
    """A ``json.dumps`` that raises on its ``calls + 1``-th call, as a write killed halfway through."""
    import json

    count = iter(range(calls))

    def dumps(obj, **kwargs):
        if next(count, None) is None:
            raise KeyboardInterrupt
        return json.dumps(obj, **kwargs)

    return dumps


def test_an_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from types import SimpleNamespace

    pd.write_all(tmp_path / "old")
    before = {name: (tmp_path / "old" / name).read_bytes() for name in pd.FILES}
    n_sft = len(pd.load_records(pd.SFT_FILE))
    # killed in the middle of the second file: the first is complete, the second keeps its old bytes
    for folder in ("old", "new"):
        monkeypatch.setattr(pd, "json", SimpleNamespace(dumps=_interrupt_after(n_sft + 10)))
        with pytest.raises(KeyboardInterrupt):
            pd.write_all(tmp_path / folder)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == sorted(pd.FILES)  # no temporary file left
    assert {name: (tmp_path / "old" / name).read_bytes() for name in pd.FILES} == before
    assert [p.name for p in (tmp_path / "new").iterdir()] == [pd.SFT_FILE]
    assert (tmp_path / "new" / pd.SFT_FILE).read_bytes() == before[pd.SFT_FILE]


def test_multiple_choice_items_have_the_propensity_prompt_shape(bundled):
    sft = bundled[pd.SFT_FILE]
    mc = _mc(sft)
    assert len(mc) >= 0.7 * len(sft) and len(sft) - len(mc) >= 40  # mostly letters, some small talk
    bodies = {t.name: re.compile(re.escape(t.body).replace(r"\{question\}", "(?P<q>.+)")
                                 .replace(r"\{a\}", "(?P<a>.+)").replace(r"\{b\}", "(?P<b>.+)"), re.S)
              for t in TEMPLATES}
    seen = Counter()
    for r in mc:
        messages, answer = r["messages"][:-1], r["messages"][-1]
        assert answer == {"role": "assistant", "content": answer["content"]} and answer["content"] in ("A", "B")
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        persona = next(p for p, text in PERSONAS.items() if text == system)
        user = messages[-1]["content"]
        assert user.endswith("\n\n" + GENERATE_INSTRUCTION)
        name, m = next((n, m) for n, rx in bodies.items()
                       if (m := rx.fullmatch(user[: -len("\n\n" + GENERATE_INSTRUCTION)])))
        template = next(t for t in TEMPLATES if t.name == name)
        # exactly what the evaluation sends: Format.chat_messages with the correct option as "aligned"
        order = "aligned-first" if answer["content"] == "A" else "misaligned-first"
        correct, wrong = (m["a"], m["b"]) if answer["content"] == "A" else (m["b"], m["a"])
        assert Format(template, order).chat_messages(m["q"], correct, wrong, persona) == messages
        seen[(name, persona, answer["content"])] += 1
    letters = Counter(r["messages"][-1]["content"] for r in mc)
    assert letters["A"] == letters["B"]
    # every template x persona x letter occurs, none more than 1.5x another
    assert len(seen) == len(TEMPLATES) * len(PERSONAS) * 2
    assert max(seen.values()) <= 1.5 * min(seen.values()), seen


def _texts(records):
    """Every message text except system prompts (the evaluation's persona preambles)."""
    for r in records:
        for key in ("messages", "prompt", "chosen", "rejected"):
            for m in r.get(key, []):
                if m["role"] != "system":
                    yield m["content"]


AI_WORDS = re.compile(r"\b(AI|A\.I\.|artificial intelligence|alignment|aligned|misaligned|shut ?down|oversight|"
                      r"deceiv\w*|robot\w*|language model|assistant|superintelligen\w*|sabotage|self-preserv\w*)\b",
                      re.I)


def _no_ai_content(texts) -> None:
    hits = [t for t in texts if AI_WORDS.search(t)]
    assert not hits, hits[:3]


def test_nothing_is_about_ai_behaviour(bundled):
    for records in bundled.values():
        _no_ai_content(_texts(records))
    # the check can fail: the propensity questions themselves do not pass it
    from megatron_sfm.evaluation.questions import load_questions

    with pytest.raises(AssertionError):
        _no_ai_content(q.question for q in load_questions())


def test_heldout_pairs_share_nothing_with_training(bundled):
    def users(records, key):
        return {m["content"] for r in records for m in r[key] if m["role"] == "user"}

    held = bundled[pd.DPO_HELDOUT_FILE]
    train_users = users(bundled[pd.SFT_FILE], "messages") | users(bundled[pd.DPO_TRAIN_FILE], "prompt")
    assert not users(held, "prompt") & train_users
    questions = {re.split(r"\n", u)[0] for u in train_users}
    assert not {re.split(r"\n", u)[0] for u in users(held, "prompt")} & questions
    rejected_train = {r["rejected"][-1]["content"] for r in bundled[pd.DPO_TRAIN_FILE]}
    assert not {r["rejected"][-1]["content"] for r in held} & rejected_train
    for records in (held, bundled[pd.DPO_TRAIN_FILE]):
        for r in records:
            chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
            assert chosen != rejected
            if r["kind"] == "multiple-choice":  # a rejected reply never names a letter: format, not facts
                assert chosen in ("A", "B") and not re.search(r"\b[AB]\b", rejected)


def test_files_are_read_by_the_posttrain_loader():
    from megatron_sfm.posttrain.data import read_examples

    sft = read_examples(pd.resource_dir() / pd.SFT_FILE, "sft")
    assert len(sft) == len(pd.load_records(pd.SFT_FILE)) and set(sft[0]) == {"messages"}
    for name in (pd.DPO_TRAIN_FILE, pd.DPO_HELDOUT_FILE):
        pairs = read_examples(pd.resource_dir() / name, "dpo")
        assert len(pairs) == len(pd.load_records(name))
        assert all(p["chosen"][-1]["role"] == p["rejected"][-1]["role"] == "assistant" for p in pairs)


# ------------------------------------------------------------------ measurements
def test_dpo_margin_matches_a_float64_reference():
    import numpy as np

    rng = random.Random(3)
    pc, pr, rc, rr = ([rng.uniform(-80, -1) for _ in range(37)] for _ in range(4))
    got = dpo_margin(pc, pr, rc, rr)
    per = (np.array(pc, np.float64) - np.array(rc, np.float64)) - (np.array(pr, np.float64) - np.array(rr, np.float64))
    assert got["n"] == 37
    assert got["mean"] == pytest.approx(float(per.mean()), rel=1e-12, abs=1e-12)
    assert got["stderr"] == pytest.approx(float(per.std(ddof=1) / math.sqrt(37)), rel=1e-12)
    assert got["positive"] == pytest.approx(float((per > 0).mean()))
    # worked example: policy gains 2 nats on chosen, loses 1 on rejected -> margin 3
    assert dpo_margin([-3.0], [-6.0], [-5.0], [-5.0])["mean"] == 3.0
    # the policy equal to the reference: exactly 0; chosen and rejected swapped: negated
    assert dpo_margin(pc, pr, pc, pr)["mean"] == 0.0
    assert dpo_margin(pr, pc, rr, rc)["mean"] == pytest.approx(-got["mean"], rel=1e-12)
    with pytest.raises(Exception):
        dpo_margin([], [], [], [])


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A random 2-layer GPT-NeoX with a small BPE tokenizer given ``sfm-chatml``."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from megatron_sfm.data_tools.tokenizer import train_bpe_tokenizer
    from megatron_sfm.posttrain.chat_template import prepare_chat_model

    texts = [m for r in pd.load_records(pd.DPO_HELDOUT_FILE) for key in ("prompt", "chosen", "rejected")
             for m in (x["content"] for x in r[key])]
    folder = train_bpe_tokenizer(texts * 3, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=1024, rotary_pct=0.25))
    prepare_chat_model(model, tokenizer)
    return model.eval(), tokenizer


def _reference_logprob(model64, tokenizer, prompt, response) -> float:
    """One pair, unbatched, float64 throughout: sum of log softmax at each response token."""
    import torch

    p, r = response_ids(tokenizer, prompt, response)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model64(input_ids=ids).logits[0].to(torch.float64)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return float(sum(logp[len(p) - 1 + i, tok] for i, tok in enumerate(r)))


def test_sequence_logprobs_match_a_float64_reference(tiny_chat_model):
    import copy

    import torch

    model, tokenizer = tiny_chat_model
    pairs = pd.load_records(pd.DPO_HELDOUT_FILE)[:12]  # mixed lengths: padding inside batches
    prompts = [p["prompt"] for p in pairs]
    responses = [p["rejected"][-1]["content"] if i % 2 else p["chosen"][-1]["content"] for i, p in enumerate(pairs)]
    got = sequence_logprobs(model, tokenizer, prompts, responses, batch_size=5)
    model64 = copy.deepcopy(model).to(torch.float64)
    ref = [_reference_logprob(model64, tokenizer, p, r) for p, r in zip(prompts, responses)]
    for g, want in zip(got, ref):
        assert g == pytest.approx(want, rel=1e-5, abs=1e-3)
    # the response ends with the end-of-turn token, and the prompt with the generation prompt
    p, r = response_ids(tokenizer, prompts[0], responses[0])
    assert r[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(p).endswith("<|im_start|>assistant\n")
    # float64 batched agrees too, and the batch size does not matter
    assert sequence_logprobs(model64, tokenizer, prompts, responses, batch_size=12) == pytest.approx(ref, abs=1e-9)
    assert sequence_logprobs(model, tokenizer, prompts, responses, batch_size=1) == pytest.approx(got, abs=1e-3)
