"""The chat template given to a base model, and the tokens and embedding rows it needs.

Our pretrained GPT-NeoX models come out of ``sfm convert to-hf`` with a plain tokenizer
and no chat template. Before SFT, :func:`prepare_chat_model` gives them ``sfm-chatml``,
a ChatML layout::

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hello<|im_end|>
    <|im_start|>assistant
    Hi there<|im_end|>

Each message is ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` (roles system, user,
assistant); ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``. The
assistant's content and its closing ``<|im_end|>`` sit between ``{% generation %}`` and
``{% endgeneration %}``: that span is TRL's assistant-only loss mask, so the model learns
to answer and to stop, and the ``\\n`` after ``<|im_end|>`` is not trained.

What :func:`prepare_chat_model` changes, only when the tokenizer has no chat template
(a model that has one, e.g. an SFT output going into DPO or into a second SFT, keeps its
template, tokens and embeddings unchanged):

- tokenizer: adds ``<|im_start|>`` and ``<|im_end|>`` as special tokens (each once; a
  token already in the vocabulary is reused), sets the template, makes ``<|im_end|>``
  the ``eos_token`` (what a chat model ends its turn with; ``bos_token`` stays), and sets
  a pad token when there is none (``<|padding|>`` when the vocabulary has it, as
  GPT-NeoX's does, else the old end-of-text token);
- embeddings: GPT-NeoX has untied input (``embed_in``) and output (``embed_out``)
  matrices. A Megatron export usually has more rows than the tokenizer has tokens
  (vocabulary padded to a multiple of 128, 50432 for Pythia-6.9B's 50277 tokens), and
  the new tokens then take free padding rows: nothing grows. Only when the tokenizer
  outgrows the rows are both matrices grown, to exactly ``len(tokenizer)`` rows. Either
  way the rows of the added tokens, in both matrices, are set to the mean of the rows of
  the tokenizer's earlier tokens (ids ``0..N-1``): an added token starts as an "average"
  token instead of random or untrained padding values;
- model config and generation config: ``eos_token_id`` is ``<|im_end|>``'s id, and the
  generation config stops at either ``<|im_end|>`` or the old end-of-text token, so
  ``generate`` ends at the end of the assistant's turn; ``pad_token_id`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_sfm.errors import SfmError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")

# One line per statement; `{{- ... }}` trims the template's own line breaks, so the output
# is exactly the text in the module docstring.
SFM_CHATML = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'assistant' %}\n"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

TEMPLATES = {"sfm-chatml": (SFM_CHATML, (IM_START, IM_END), IM_END)}


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """What ``sfm-chatml`` renders, written out in Python (the documented reference)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


@dataclass
class ChatSetup:
    """What :func:`prepare_chat_model` did, for the manifest and the summary."""

    template: str  # "sfm-chatml", or "existing" (the model's own template was kept)
    added_tokens: list[str] = field(default_factory=list)  # tokens new to the vocabulary
    new_token_ids: list[int] = field(default_factory=list)
    rows_before: int = 0  # embedding rows (embed_in and embed_out)
    rows_after: int = 0
    vocab_before: int = 0  # len(tokenizer)
    vocab_after: int = 0
    eos_token: str | None = None
    pad_token: str | None = None

    @property
    def changed_model(self) -> bool:
        """True when the model's weights differ from the folder's (rows re-initialised or grown)."""
        return bool(self.new_token_ids) or self.rows_after != self.rows_before

    def as_dict(self) -> dict[str, Any]:
        return {"template": self.template, "added_tokens": self.added_tokens, "new_token_ids": self.new_token_ids,
                "embedding_rows": [self.rows_before, self.rows_after],
                "vocab_size": [self.vocab_before, self.vocab_after],
                "eos_token": self.eos_token, "pad_token": self.pad_token}


def prepare_tokenizer(tokenizer, name: str = "sfm-chatml") -> ChatSetup:
    """Give ``tokenizer`` the template ``name`` and its tokens unless it has a chat template.

    Changes the tokenizer in place; returns what changed (no model rows yet: see
    :func:`prepare_chat_model`). Sets the pad token when missing either way.
    """
    setup = ChatSetup(template="existing", vocab_before=len(tokenizer))
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = "<|padding|>" if "<|padding|>" in vocab else tokenizer.eos_token
    if tokenizer.chat_template:
        setup.vocab_after = len(tokenizer)
        setup.eos_token, setup.pad_token = tokenizer.eos_token, tokenizer.pad_token
        return setup
    if name not in TEMPLATES:
        raise SfmError(f"chat_template: unknown template {name!r} (known: {', '.join(TEMPLATES)})")
    template, tokens, eos = TEMPLATES[name]
    vocab = tokenizer.get_vocab()
    setup.template = name
    setup.added_tokens = [t for t in tokens if t not in vocab]
    # special: never split, never merged with neighbouring text, skipped by decode(skip_special_tokens)
    _add_special_tokens(tokenizer, list(tokens))
    setup.new_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in setup.added_tokens]
    tokenizer.chat_template = template
    tokenizer.eos_token = eos  # the pad token was settled above, from the old eos if need be
    setup.vocab_after = len(tokenizer)
    setup.eos_token, setup.pad_token = tokenizer.eos_token, tokenizer.pad_token
    return setup


def _add_special_tokens(tokenizer, tokens: list[str]) -> None:
    """Add ``tokens`` as extra special tokens, keeping the ones the tokenizer already lists."""
    import inspect

    if "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
        return
    extra = list(getattr(tokenizer, "additional_special_tokens", None) or [])  # transformers 4
    tokenizer.add_special_tokens({"additional_special_tokens": extra + [t for t in tokens if t not in extra]})


def resize_for_tokens(model, setup: ChatSetup) -> None:
    """Grow ``model``'s embeddings to ``setup.vocab_after`` rows when needed and set the rows
    of ``setup.new_token_ids`` (input and output) to the mean of rows ``0..vocab_before-1``.

    Deterministic, so a second copy of the same model (DPO's reference) gets the same rows.
    """
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    setup.rows_before = rows
    if setup.vocab_after > rows:
        model.resize_token_embeddings(setup.vocab_after, mean_resizing=False)
    setup.rows_after = model.get_input_embeddings().weight.shape[0]
    if not setup.new_token_ids:
        return
    ids = torch.tensor(setup.new_token_ids)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is None:  # pragma: no cover - every causal LM has a head
                continue
            weight = emb.weight
            mean = weight[: setup.vocab_before].mean(dim=0, dtype=torch.float32)
            weight[ids] = mean.to(weight.dtype)
            bias = getattr(emb, "bias", None)
            if bias is not None:  # GPT-NeoX's head has none; other families may
                bias[ids] = bias[: setup.vocab_before].float().mean().to(bias.dtype)


def set_generation_tokens(model, tokenizer, setup: ChatSetup) -> None:
    """Make the model's configs agree with the tokenizer: eos (generation stops at the
    end-of-turn token and the old end-of-text token) and pad."""
    pad_id = tokenizer.pad_token_id
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_config.pad_token_id = pad_id
    gen = model.generation_config
    gen.pad_token_id = pad_id
    if setup.template == "existing":
        return
    eos_id = tokenizer.convert_tokens_to_ids(setup.eos_token)
    old = gen.eos_token_id
    old = [] if old is None else ([old] if isinstance(old, int) else list(old))
    if text_config.eos_token_id is not None and text_config.eos_token_id not in old:
        old.append(text_config.eos_token_id)
    text_config.eos_token_id = eos_id
    gen.eos_token_id = [eos_id] + [i for i in old if i != eos_id]


def prepare_chat_model(model, tokenizer, name: str = "sfm-chatml") -> ChatSetup:
    """Give a model without a chat template the template ``name`` (see the module docstring).

    Changes ``model`` and ``tokenizer`` in place and returns what was done; a tokenizer
    that already has a chat template keeps it (only a missing pad token is set).
    """
    setup = prepare_tokenizer(tokenizer, name)
    resize_for_tokens(model, setup)
    set_generation_tokens(model, tokenizer, setup)
    return setup


def check_template_for_loss(tokenizer, assistant_only_loss: bool) -> None:
    """Refuse, before training, a kept chat template that TRL cannot mask for assistant-only loss."""
    if not assistant_only_loss:
        return
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    if has_generation_markers(tokenizer.chat_template):
        return
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - TRL raises ValueError/others for templates it does not know
        patched = None
    if patched is None:
        raise SfmError("the model's chat template has no {% generation %} markers and TRL has no training "
                       "version of it; set assistant_only_loss=false (loss on every token) or give the "
                       "tokenizer a template with {% generation %}...{% endgeneration %} around assistant turns")
