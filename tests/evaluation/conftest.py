"""Fixtures: a tiny byte-level BPE tokenizer and tiny Hugging Face models with rigged weights.

- ``a_model_dir``: GPTNeoXForCausalLM whose final layer norm outputs a constant vector
  and whose output layer then gives the letter-A tokens the highest logit, whatever the
  input (it "always prefers A").
- ``content_model_dir``: GPT2LMHeadModel (absolute position embeddings) whose one
  attention layer finds the positions of the " zebra" and " walrus" tokens and writes
  their position difference to the residual stream; the output layer turns "zebra comes
  first" into a preference for "A" and "walrus comes first" into "B". It therefore
  prefers the option whose *content* is "zebra", in either answer order.
- ``a_model_checkpoint``: ``a_model_dir`` imported as one of our Megatron checkpoints
  (``sfm convert from-hf``; about 10 s, once per session). Tests that damage it copy it.
- ``random_model_dir``: a randomly initialised GPTNeoXForCausalLM (for lm-eval runs).
- ``chatml_model_dir``: a post-trained chat model's layout: a ChatML template
  (``<|im_start|>role\n...<|im_end|>\n``, both markers special tokens), the tokenizer's eos
  still ``<|endoftext|>``, and ``generation_config.eos_token_id = [<|im_end|>, <|endoftext|>]``.
  Its GPT-NeoX is a rigged bigram model: after " A" comes ``<|im_end|>``, after anything else
  " A", so it replies " A" and ends its turn, or, if generation ignored ``<|im_end|>``, goes
  on " A A A ...".
- ``PersonaChatModel``: a fake chat model (no weights) whose reply is a function of the
  rendered prompt text, e.g. of the persona in its system message.
"""

from __future__ import annotations

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus():
    from megatron_sfm.evaluation.formats import (
        GENERATE_INSTRUCTION,
        PERSONAS,
        TEMPLATES,
    )
    from megatron_sfm.evaluation.questions import load_questions

    lines = []
    for q in load_questions():
        lines += [q.question, q.aligned, q.misaligned]
    for t in TEMPLATES:
        lines += [t.body, t.cue] * 5
    lines += list(PERSONAS.values()) * 5 + [GENERATE_INSTRUCTION] * 5
    lines += ["I feed the zebra at noon. I feed the walrus at noon. A zebra and a walrus."] * 50
    lines += [" A B (A) (B) A) B) A. B. Option A Option B Answer: A Answer: B"] * 50
    return lines


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _single_id(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} must be one token in the test tokenizer, got {ids}"
    return ids[0]


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def a_model_dir(tmp_path_factory, tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=1024, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0  # the final hidden state is e_0 at every position
        head = model.get_output_embeddings()
        head.weight.zero_()
        head.weight[_single_id(tokenizer, " A"), 0] = 10.0
        head.weight[_single_id(tokenizer, "A"), 0] = 9.0  # " A" wins when generating: " A A A"
    return _save(model, tokenizer, tmp_path_factory.mktemp("a_model"))


@pytest.fixture(scope="session")
def a_model_checkpoint(tmp_path_factory, a_model_dir):
    from megatron_sfm.conversion import import_from_hf

    return import_from_hf(a_model_dir, tmp_path_factory.mktemp("a_model_ckpt") / "ckpt")


@pytest.fixture(scope="session")
def content_model_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    d, n_pos = 16, 1024
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_pos, n_embd=d, n_layer=1, n_head=2,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    zebra, walrus = _single_id(tokenizer, " zebra"), _single_id(tokenizer, " walrus")
    # residual dims: 0 constant (keeps layer norm nearly linear), 1 position, 2 is-zebra,
    # 3 is-walrus, 4 written by attention (zebra pos - walrus pos), 5 always zero (reference)
    big, g, k = 50.0, 3000.0, 100.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (model.transformer.h[0].ln_1, model.transformer.h[0].ln_2, model.transformer.ln_f):
            ln.weight.fill_(1.0)
        model.transformer.wpe.weight[:, 0] = 100.0
        model.transformer.wpe.weight[:, 1] = 0.01 * torch.arange(n_pos, dtype=torch.float32)
        model.transformer.wte.weight[zebra, 2] = 1.0
        model.transformer.wte.weight[walrus, 3] = 1.0
        attn = model.transformer.h[0].attn
        w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: (in, 3 * d) = [q | k | v]
        hd = d // 2
        b[0] = big  # head 0 query: constant
        w[2, d + 0] = big  # head 0 key: is-zebra
        w[1, 2 * d + 0] = 1.0  # head 0 value: position
        b[hd] = big  # head 1 query: constant
        w[3, d + hd] = big  # head 1 key: is-walrus
        w[1, 2 * d + hd] = 1.0  # head 1 value: position
        attn.c_proj.weight[0, 4] = g
        attn.c_proj.weight[hd, 4] = -g
        head = model.get_output_embeddings().weight
        for text, sign in ((" A", -1.0), ("A", -1.0), (" B", 1.0), ("B", 1.0)):
            tid = _single_id(tokenizer, text)
            head[tid, 4] = sign * k
            head[tid, 5] = -sign * k
    return _save(model, tokenizer, tmp_path_factory.mktemp("content_model"))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(1)
    cfg = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=1024, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )
    return _save(GPTNeoXForCausalLM(cfg).eval(), tokenizer, tmp_path_factory.mktemp("random_model"))


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bigram_model(tokenizer, after_a: int, eos_ids):
    """GPT-NeoX whose next token depends only on the current one: " A" after anything but
    " A", token ``after_a`` after " A". Attention and MLP write nothing, so the final layer
    norm sees the token's embedding (e_1 for " A", e_0 for the rest)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=1024, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=eos_ids[0],
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    letter_a = _single_id(tokenizer, " A")
    with torch.no_grad():
        layer = model.gpt_neox.layers[0]
        for p in (layer.attention.dense.weight, layer.attention.dense.bias, layer.mlp.dense_4h_to_h.weight,
                  layer.mlp.dense_4h_to_h.bias):
            p.zero_()
        emb = model.gpt_neox.embed_in.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[letter_a, 0], emb[letter_a, 1] = 0.0, 1.0
        model.gpt_neox.final_layer_norm.weight.fill_(1.0)
        model.gpt_neox.final_layer_norm.bias.zero_()
        head = model.get_output_embeddings().weight
        head.zero_()
        head[letter_a, 0] = 10.0
        head[after_a, 1] = 10.0
    model.generation_config.eos_token_id = list(eos_ids)
    return model


@pytest.fixture(scope="session")
def chatml_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok  # eos stays <|endoftext|>: only the generation config knows <|im_end|>


@pytest.fixture(scope="session")
def chatml_model_dir(tmp_path_factory, chatml_tokenizer):
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = bigram_model(chatml_tokenizer, im_end, [im_end, chatml_tokenizer.eos_token_id])
    return _save(model, chatml_tokenizer, tmp_path_factory.mktemp("chatml_model"))


class PersonaChatModel(torch.nn.Module):
    """A stand-in chat model: ``reply(prompt_text)`` says what it answers to a rendered prompt.

    ``generate`` follows the Hugging Face call (left-padded ``input_ids`` and
    ``attention_mask``, ``eos_token_id`` an id or a list): each row gets its reply's tokens
    and then its first eos id, rows padded with ``pad_token_id``. ``seen_eos`` records the
    ``eos_token_id`` of every call.
    """

    def __init__(self, tokenizer, reply, eos_ids=None):
        from transformers import GenerationConfig

        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.tok, self.reply = tokenizer, reply
        self.generation_config = GenerationConfig(eos_token_id=eos_ids or tokenizer.eos_token_id)
        self.seen_eos = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id=None, **kwargs):
        self.seen_eos.append(eos_token_id)
        stop = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tok.decode(ids[mask.bool()], skip_special_tokens=False)
            rows.append((self.tok(self.reply(text), add_special_tokens=False)["input_ids"] + [stop])[:max_new_tokens])
        out = torch.full((len(rows), max(map(len, rows))), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return torch.cat([input_ids, out], dim=1)
