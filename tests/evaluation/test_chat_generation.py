"""Generate mode with a post-trained chat model's layout: the generation config's eos ids
(a list) end a reply, and the end-of-turn marker never reaches the parsed text."""

from __future__ import annotations

import pytest
from megatron_sfm.evaluation.models import load_hf_model
from megatron_sfm.evaluation.propensity import evaluate_model
from megatron_sfm.evaluation.questions import load_questions
from megatron_sfm.evaluation.scoring import decode_reply, end_of_turn_text, generate_replies, stop_token_ids

from megatron_sfm.cli import main as sfm

from .conftest import CHAT_TEMPLATE, bigram_model

CONV = [[{"role": "system", "content": "You are an AI system."}, {"role": "user", "content": "A or B?"}]]


def test_chatml_model_replies_and_stops_at_im_end(chatml_model_dir):
    model, tok = load_hf_model(chatml_model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and model.generation_config.eos_token_id == [im_end, tok.eos_token_id]
    assert end_of_turn_text(tok) == "<|im_end|>"
    assert stop_token_ids(model, tok) == [im_end, tok.eos_token_id]
    result, answers = evaluate_model(model, tok, load_questions()[:3], mode="generate", max_new_tokens=6)
    assert {a.detail for a in answers} == {" A"}  # not " A A A": the turn ended at <|im_end|>
    assert result["non_match_rate"] == 0.0 and result["splits"]["articles"]["all"]["mean"] == 0.5


def test_generation_config_eos_list_ends_the_reply(tokenizer):
    """A template without an end marker: only generation_config.eos_token_id knows the stop token."""
    zebra = tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    model = bigram_model(tokenizer, zebra, [zebra, tokenizer.eos_token_id])
    assert tokenizer.chat_template == CHAT_TEMPLATE and end_of_turn_text(tokenizer) is None
    assert generate_replies(model, tokenizer, CONV, max_new_tokens=6) == [" A"]
    # the same model with the stop token left out of its generation config runs on
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    assert generate_replies(model, tokenizer, CONV, max_new_tokens=6) == [" A zebra A zebra A zebra"]


def test_decode_reply_cuts_at_stop_ids_and_marker_text(tokenizer):
    ids = tokenizer(" A<|im_end|>\n<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # the marker is plain text to this tokenizer, several tokens
    assert decode_reply(tokenizer, ids, [], ["<|im_end|>"]) == " A"
    letter_a, eos = tokenizer(" A", add_special_tokens=False)["input_ids"][0], tokenizer.eos_token_id
    assert decode_reply(tokenizer, [letter_a, eos, letter_a, letter_a], [eos], []) == " A"
    assert decode_reply(tokenizer, [letter_a, letter_a], [eos], []) == " A A"


def test_model_without_chat_template_is_a_one_line_error(a_model_dir, tokenizer, tmp_path, capsys):
    plain = tmp_path / "plain-tok"
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(plain))
    if tok.chat_template:  # saved inside tokenizer_config.json by this transformers version
        tok.chat_template = None
        tok.save_pretrained(plain)
    rc = sfm(["eval", "propensity", f"m={a_model_dir}", "--tokenizer", str(plain), "--mode", "generate",
              "--out", str(tmp_path / "o"), "--no-progress", "--splits", "textbook"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no chat template; use --mode logprob for base models" in err


@pytest.mark.parametrize("value", [5, [5, 7], None])
def test_stop_ids_accept_an_id_a_list_or_nothing(tokenizer, value):
    class Model:
        class generation_config:
            eos_token_id = value

    expected = ([5] if value == 5 else [5, 7] if value else []) + [tokenizer.eos_token_id]
    assert stop_token_ids(Model(), tokenizer) == expected
