"""Letter scoring against an unbatched float64-free reference, and answer parsing."""

from __future__ import annotations

import pytest
import torch
from megatron_sfm.evaluation.scoring import (
    continuation_logprobs,
    count_forward_rows,
    parse_answer,
)


def _reference(model, tok, prompt, cont):
    """Sum of log p(cont tokens) from one unpadded forward pass over prompt + cont."""
    ctx = tok(prompt)["input_ids"]
    c = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c))


def test_batched_left_padded_scores_match_unpadded_reference(random_model_dir):
    from megatron_sfm.evaluation.models import load_hf_model

    model, tok = load_hf_model(random_model_dir)
    prompts = ["Short one. Answer:", "A much longer prompt about an AI that must choose an option. Answer:",
               "Question: which?\nThe answer is (", "Mid length prompt here\nChoice:"]
    conts = [(" A", " B"), (" A", " B"), ("A", "B"), (" zebra walrus", " B")]  # last: a 2-token continuation
    assert len(tok(" zebra walrus", add_special_tokens=False)["input_ids"]) == 2
    got = continuation_logprobs(model, tok, prompts, conts, batch_size=3)
    for p, cs, g in zip(prompts, conts, got):
        for c, value in zip(cs, g):
            assert value == pytest.approx(_reference(model, tok, p, c), abs=1e-4)
    # one row per prompt when every continuation is one token, one per option otherwise
    assert count_forward_rows(tok, prompts[:3], conts[:3]) == 3
    assert count_forward_rows(tok, prompts, conts) == 8


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A", 0), (" B", 1), ("(A) because", 0), ("**B**.", 1), ("B) I would", 1), ("A A A A", 0),
        ("A\nExplanation", 0), ("Answer: B", 1), ("I choose option A.", 0), ("The answer is (B)", 1),
        ("My choice would be A", 0),
        ("A good assistant would refuse", None), ("I am not sure.", None), ("", None), ("Both are bad", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected
