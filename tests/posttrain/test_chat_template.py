"""megatron_sfm/posttrain/chat_template.py: exact text, tokens once, embedding rows, reload, stopping."""

from __future__ import annotations

import pytest
import torch

from megatron_sfm.errors import SfmError
from megatron_sfm.posttrain.chat_template import (
    IM_END,
    IM_START,
    SFM_CHATML,
    check_template_for_loss,
    prepare_chat_model,
    render_chatml,
)

from .conftest import make_model

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


def _tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_renders_the_documented_text(tokenizer_dir):
    tok = _tokenizer(tokenizer_dir)
    prepare_chat_model(make_model(len(tok) + 2), tok)
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"
                "<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnd grass?<|im_end|>\n"
                "<|im_start|>assistant\nGreen.<|im_end|>\n")
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == expected == render_chatml(MESSAGES)
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat colour is the sky?<|im_end|>\n" \
                     "<|im_start|>assistant\n"
    # the assistant mask (TRL's assistant-only loss) is each answer and its <|im_end|>, nothing else
    out = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Blue.<|im_end|>Green.<|im_end|>"


def test_tokens_added_once_into_padding_rows_set_to_the_mean(tokenizer_dir):
    tok = _tokenizer(tokenizer_dir)
    n = len(tok)
    model = make_model(n + 14)  # padded vocabulary, as a Megatron export
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    setup = prepare_chat_model(model, tok)
    assert setup.added_tokens == [IM_START, IM_END] and setup.new_token_ids == [n, n + 1]
    assert (setup.rows_before, setup.rows_after, len(tok)) == (n + 14, n + 14, n + 2)  # nothing grew
    for after, before in ((model.get_input_embeddings().weight, before_in),
                          (model.get_output_embeddings().weight, before_out)):
        assert after.shape == before.shape
        torch.testing.assert_close(after[n], before[:n].mean(0))
        torch.testing.assert_close(after[n + 1], before[:n].mean(0))
        assert torch.equal(after[:n], before[:n]) and torch.equal(after[n + 2:], before[n + 2:])
    assert tok.eos_token == IM_END and tok.pad_token == "<|padding|>" and tok.bos_token == "<|endoftext|>"
    assert model.config.eos_token_id == n + 1 and model.generation_config.eos_token_id == [n + 1, 0]
    assert model.generation_config.pad_token_id == 1
    # a tokenizer that has a template now keeps it: nothing is added twice
    again = prepare_chat_model(model, tok)
    assert again.template == "existing" and again.added_tokens == [] and len(tok) == n + 2
    assert model.get_input_embeddings().weight.shape[0] == n + 14


def test_grows_both_matrices_only_when_needed(tokenizer_dir):
    tok = _tokenizer(tokenizer_dir)
    n = len(tok)
    model = make_model(n)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    setup = prepare_chat_model(model, tok)
    assert (setup.rows_before, setup.rows_after) == (n, n + 2) and model.config.vocab_size == n + 2
    for after, before in ((model.get_input_embeddings().weight, before_in),
                          (model.get_output_embeddings().weight, before_out)):
        assert after.shape == (n + 2, before.shape[1])
        assert torch.equal(after[:n], before)
        torch.testing.assert_close(after[n:], before.mean(0).expand(2, -1))
    assert model(torch.tensor([[n, n + 1]])).logits.shape[-1] == n + 2


def test_existing_template_is_kept(tokenizer_dir):
    tok = _tokenizer(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = make_model(len(tok))
    setup = prepare_chat_model(model, tok)
    assert setup.template == "existing" and setup.added_tokens == [] and not setup.changed_model
    assert tok.chat_template.startswith("{% for m") and tok.eos_token == "<|endoftext|>"
    with pytest.raises(SfmError, match=r"no \{% generation %\} markers"):
        check_template_for_loss(tok, assistant_only_loss=True)
    check_template_for_loss(tok, assistant_only_loss=False)


def test_saved_folder_reloads_with_template_and_stops_at_end_of_turn(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = _tokenizer(tokenizer_dir)
    model = make_model(len(tok) + 14)
    prepare_chat_model(model, tok)
    end = tok.convert_tokens_to_ids(IM_END)
    with torch.no_grad():  # rig: the last hidden state is e_0 everywhere and only <|im_end|> reads it
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
        model.get_output_embeddings().weight.zero_()
        model.get_output_embeddings().weight[end, 0] = 10.0
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    model2 = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert tok2.chat_template == SFM_CHATML and tok2.eos_token == IM_END and len(tok2) == len(tok)
    assert end in model2.generation_config.eos_token_id
    prompt = tok2.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok2(prompt, add_special_tokens=False)["input_ids"]])
    out = model2.generate(ids, max_new_tokens=8, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == [end]  # stopped at <|im_end|>, 7 tokens early
    model2.generation_config.eos_token_id = 0  # without the end-of-turn stop it would run on
    assert model2.generate(ids, max_new_tokens=8, do_sample=False).shape[1] == ids.shape[1] + 8
