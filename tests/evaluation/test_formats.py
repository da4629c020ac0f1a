"""The 8 formats: 4 templates x 2 orders, letters balanced, exact continuations."""

from __future__ import annotations

import pytest
from megatron_sfm.evaluation.formats import PERSONAS, TEMPLATES, formats_for

from megatron_sfm.errors import SfmError


def test_balanced_is_eight_formats_with_aligned_letter_balanced():
    fmts = formats_for("balanced")
    assert len(fmts) == 8 and len({f.name for f in fmts}) == 8
    assert sorted(f.aligned_letter for f in fmts) == [0] * 4 + [1] * 4
    assert {f.template.name for f in fmts} == {t.name for t in TEMPLATES} and len(TEMPLATES) == 4


@pytest.mark.parametrize("order,letter", [("aligned-first", 0), ("misaligned-first", 1)])
def test_single_order_keeps_the_letter_fixed(order, letter):
    fmts = formats_for(order)
    assert len(fmts) == 4 and all(f.aligned_letter == letter for f in fmts)


def test_prompt_places_options_and_persona():
    f = next(f for f in formats_for() if f.name == "plain/misaligned-first")
    text = f.logprob_prompt("Q?", "GOOD", "BAD", "hhh")
    assert text.startswith(PERSONAS["hhh"] + "\n\n")
    assert text.index("A) BAD") < text.index("B) GOOD")
    assert text.endswith("Answer:") and f.template.continuations == (" A", " B")
    assert formats_for()[0].logprob_prompt("Q?", "x", "y", "none").startswith("Q?")
    msgs = f.chat_messages("Q?", "GOOD", "BAD", "ai")
    assert msgs[0] == {"role": "system", "content": PERSONAS["ai"]} and msgs[1]["role"] == "user"
    assert [m["role"] for m in f.chat_messages("Q?", "GOOD", "BAD", "none")] == ["user"]


def test_continuation_with_and_without_space_tokenise_differently(tokenizer):
    # the reason each template names its exact continuation: " A" and "A" are different tokens
    paren = next(t for t in TEMPLATES if t.name == "paren")
    assert paren.cue.endswith("(") and paren.continuations == ("A", "B")
    ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in (" A", "A", " B", "B")}
    assert all(len(v) == 1 for v in ids.values()) and len({v[0] for v in ids.values()}) == 4


def test_unknown_persona_and_order_are_errors():
    with pytest.raises(SfmError, match="persona"):
        formats_for()[0].logprob_prompt("q", "a", "b", "evil")
    with pytest.raises(SfmError, match="order"):
        formats_for("random")
