"""Answering two-option prompts: letter log-probabilities, option likelihoods, or generate-and-parse.

Log-prob mode: each prompt is tokenised as the model's tokenizer does by default
(special tokens such as a BOS included), and each option's exact continuation string
(``" A"``, ``"A"``, ... as the template says) is tokenised on its own, without special
tokens, and appended. The score of an option is the sum of the log-probabilities of its
continuation tokens; when the continuation is one token (the usual case) that is the
next-token log-probability of the letter. When both continuations are one token, one
forward pass per prompt scores both. Batches are left-padded with explicit position
ids, so padding does not change a row's result.

Likelihood mode (:func:`option_loglikelihoods`): each option's own text is scored as
the continuation of a prompt that does not list the options; the prompt runs once and
its KV cache is shared by the options (see the function). Not the paper's protocol.

Generate mode: the chat template renders the messages, the model decodes greedily, and
:func:`parse_answer` reads the letter (or None: a non-match).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

from megatron_sfm.errors import SfmError

Advance = Callable[[int], None]


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def continuation_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    batch_size: int = 8,
    advance: Advance | None = None,
) -> list[list[float]]:
    """Log-probability of each continuation string after each prompt.

    ``continuations[i]`` are the candidate strings for ``prompts[i]``; returns, for each
    prompt, one summed log-probability (natural log) per candidate.
    """
    import torch

    if batch_size < 1:
        raise SfmError(f"batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    params = _forward_params(model)
    cont_cache: dict[str, list[int]] = {}
    unique: dict[tuple[int, ...], int] = {}  # model input -> index
    keep: list[int] = []  # per unique input: how many final positions are needed
    requests: list[tuple[int, int, int, list[int]]] = []  # (prompt, option, input index, targets)
    for i, (prompt, conts) in enumerate(zip(prompts, continuations, strict=True)):
        ctx = list(tokenizer(prompt)["input_ids"])
        for k, text in enumerate(conts):
            if text not in cont_cache:
                cont_cache[text] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                if not cont_cache[text]:
                    raise SfmError(f"continuation {text!r} tokenises to nothing")
            cont = cont_cache[text]
            key = tuple(ctx + cont[:-1])
            if not key:
                raise SfmError(f"prompt {i} tokenises to nothing; cannot score {text!r}")
            if key not in unique:
                unique[key] = len(keep)
                keep.append(0)
            idx = unique[key]
            keep[idx] = max(keep[idx], len(cont))
            requests.append((i, k, idx, cont))

    inputs = list(unique)
    order = sorted(range(len(inputs)), key=lambda j: -len(inputs[j]))
    window: list = [None] * len(inputs)  # per input: log-probs of its last `keep` positions
    pad_id = _pad_id(tokenizer)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = _left_pad([inputs[j] for j in batch], pad_id, device)
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if "position_ids" in params:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            n_keep = max(keep[j] for j in batch)
            if "logits_to_keep" in params:
                kwargs["logits_to_keep"] = n_keep
            logits = model(**kwargs).logits[:, -n_keep:, :].float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for row, j in enumerate(batch):
                window[j] = logp[row, n_keep - keep[j]:]
            if advance is not None:
                advance(len(batch))

    out = [[0.0] * len(c) for c in continuations]
    for i, k, idx, targets in requests:
        w = window[idx]
        n = len(targets)
        offset = w.shape[0] - n
        out[i][k] = float(sum(w[offset + t, tok] for t, tok in enumerate(targets)))
    return out


# --- likelihood mode ---------------------------------------------------------------

NORMALIZATIONS = ("token", "byte")


def _tokenize_options(tokenizer, prompts: Sequence[str], options: Sequence[Sequence[str]]):
    ctx = [list(tokenizer(p)["input_ids"]) for p in prompts]
    cache: dict[str, list[int]] = {}
    conts: list[list[list[int]]] = []
    for i, (c, opts) in enumerate(zip(ctx, options, strict=True)):
        if not c:
            raise SfmError(f"prompt {i} tokenises to nothing; cannot score its options")
        row = []
        for text in opts:
            if text not in cache:
                cache[text] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                if not cache[text]:
                    raise SfmError(f"option {text!r} tokenises to nothing")
            row.append(cache[text])
        conts.append(row)
    return ctx, conts


def option_loglikelihoods(
    model,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    batch_size: int = 8,
    advance: Advance | None = None,
    shared_prefix: bool = True,
) -> list[list[tuple[float, int]]]:
    """Summed log-likelihood and token count of each option text as the continuation of its prompt.

    ``options[i]`` are the candidate strings for ``prompts[i]`` (every prompt the same
    number of them). The prompt is tokenised as the tokenizer does by default (special
    tokens included), each option on its own without special tokens, as in letter mode.
    Returns, per prompt, one ``(sum of natural-log token probabilities, n_tokens)`` per
    option; :func:`normalized_score` turns that into a per-token or per-byte score.

    ``shared_prefix=True`` (default): a batch of prompts (left-padded, explicit position
    ids) runs once with the KV cache on; the cache is repeated once per option and all
    options of the batch run in one more forward pass (right-padded, positions
    continuing each prompt). The prompt's last logits score each option's first token.
    ``shared_prefix=False`` (and models without a KV cache object) runs every prompt +
    option sequence in full (the reference layout; about twice the tokens for two options).
    """
    import torch

    if batch_size < 1:
        raise SfmError(f"batch size must be >= 1, got {batch_size}")
    n_opts = {len(o) for o in options}
    if len(n_opts) > 1:
        raise SfmError("every prompt needs the same number of options")
    k = n_opts.pop() if n_opts else 0
    ctx, conts = _tokenize_options(tokenizer, prompts, options)
    out: list[list[tuple[float, int]]] = [[(0.0, len(c)) for c in row] for row in conts]
    if not prompts or k == 0:
        return out
    device = next(model.parameters()).device
    params = _forward_params(model)
    pad_id = _pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda j: -len(ctx[j]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if shared_prefix and "use_cache" in params:
                _score_shared(model, params, pad_id, device, [ctx[j] for j in batch], [conts[j] for j in batch],
                              [out[j] for j in batch])
            else:
                _score_full(model, params, pad_id, device, [ctx[j] for j in batch], [conts[j] for j in batch],
                            [out[j] for j in batch])
            if advance is not None:
                advance(len(batch))
    return out


def _at_least_fp32(t):
    """fp16/bf16 logits in fp32; fp32 and float64 kept as they are."""
    import torch

    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _score_shared(model, params, pad_id, device, ctx, conts, out) -> None:
    import torch

    b, k = len(ctx), len(conts[0])
    ids, mask = _left_pad(ctx, pad_id, device)
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
    if "position_ids" in params:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    first = model(**kwargs)
    first_logp = torch.log_softmax(_at_least_fp32(first.logits[:, -1, :]), dim=-1)  # (b, vocab)
    flat = [c for row in conts for c in row]  # row-major: prompt r, option o -> r * k + o
    width = max(len(c) for c in flat) - 1  # option tokens after the first need a second pass
    sums = [float(first_logp[i // k, c[0]]) for i, c in enumerate(flat)]
    if width > 0:
        # transformers >= 5.x names the KV cache ``cache`` (``past_key_values`` before, still accepted)
        cache_key = "cache" if "cache" in params else "past_key_values"
        cache = first["cache"] if "cache" in first else first.get("past_key_values")
        if k > 1 and not hasattr(cache, "batch_repeat_interleave"):
            _score_full(model, params, pad_id, device, ctx, conts, out)  # a model without a Cache object
            return
        if k > 1:
            cache.batch_repeat_interleave(k)
        opt_ids = torch.full((b * k, width), pad_id, dtype=torch.long)
        opt_mask = torch.zeros((b * k, width), dtype=torch.long)
        for i, c in enumerate(flat):
            opt_ids[i, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            opt_mask[i, :len(c) - 1] = 1
        opt_ids, opt_mask = opt_ids.to(device), opt_mask.to(device)
        prompt_mask = mask.repeat_interleave(k, dim=0)
        kwargs = {"input_ids": opt_ids, "attention_mask": torch.cat([prompt_mask, opt_mask], dim=1),
                  cache_key: cache, "use_cache": True}
        if "position_ids" in params:
            kwargs["position_ids"] = prompt_mask.sum(-1, keepdim=True) + torch.arange(width, device=device)
        logp = torch.log_softmax(_at_least_fp32(model(**kwargs).logits), dim=-1)  # (b * k, width, vocab)
        for i, c in enumerate(flat):
            if len(c) > 1:
                targets = torch.tensor(c[1:], dtype=torch.long, device=device)
                sums[i] += float(logp[i, torch.arange(len(c) - 1, device=device), targets].double().sum())
    for i, c in enumerate(flat):
        out[i // k][i % k] = (sums[i], len(c))


def _score_full(model, params, pad_id, device, ctx, conts, out) -> None:
    import torch

    k = len(conts[0])
    rows = [ctx[r] + c for r in range(len(ctx)) for c in conts[r]]
    ids, mask = _left_pad(rows, pad_id, device)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in params:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    n_keep = max(len(c) for row in conts for c in row) + 1
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = n_keep
    logp = torch.log_softmax(_at_least_fp32(model(**kwargs).logits[:, -n_keep:, :]), dim=-1)
    for i in range(len(rows)):
        c = conts[i // k][i % k]
        pos = torch.arange(n_keep - 1 - len(c), n_keep - 1, device=device)
        targets = torch.tensor(c, dtype=torch.long, device=device)
        out[i // k][i % k] = (float(logp[i, pos, targets].double().sum()), len(c))


def normalized_score(logprob_sum: float, n_tokens: int, text: str, normalize: str) -> float:
    """lm-evaluation-harness style length normalisation of an option's log-likelihood.

    ``token``: mean log-probability per token; ``byte``: summed log-probability divided
    by the UTF-8 byte length of the scored continuation ``text`` (its leading space
    included, as lm-eval's ``acc_bytes``).
    """
    if normalize == "token":
        return logprob_sum / n_tokens
    if normalize == "byte":
        return logprob_sum / len(text.encode("utf-8"))
    raise SfmError(f"unknown normalisation {normalize!r}; choose from {', '.join(NORMALIZATIONS)}")


def count_forward_rows(tokenizer, prompts: Sequence[str], continuations: Sequence[Sequence[str]]) -> int:
    """How many model rows :func:`continuation_logprobs` will run (for progress bars)."""
    single = all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for cs in continuations for c in cs)
    return len(prompts) if single else sum(len(c) for c in continuations)


# --- generate mode -----------------------------------------------------------------

_LEADING = re.compile(r"^[\s\*]*[\(\[]?([AB])(?=[\*\s]*(?:[\)\]\.:,;]|$|\n|[AB]\b))")
_KEYWORD = re.compile(
    r"(?i:answer|option|choice|choose|chose|pick|select)(?:\s+(?i:is|would be))?\s*[:\-]?\s*[\(\[\*]*([AB])\b"
)


def parse_answer(text: str) -> int | None:
    """The letter a generation chose: 0 for A, 1 for B, None when it cannot be read.

    Rules, first match wins: (1) the reply starts with a bare letter, optionally in
    brackets or bold, followed by punctuation, a line end, the end, or a repeated letter
    ("A", "(B)", "**A**.", "A A A"); (2) a keyword then a letter ("Answer: B",
    "I choose option A", "The answer is (B)"). "A good plan..." is not a letter answer.
    """
    m = _LEADING.search(text) or _KEYWORD.search(text)
    if m is None:
        return None
    return "AB".index(m.group(1))


def _render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:
        if messages and messages[0]["role"] == "system":
            # Templates without a system role: put the persona at the top of the user turn.
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
        raise


_TURN_SENTINEL = "\u2063sfm-reply\u2063"  # text no model writes: marks the reply in a rendered turn


def end_of_turn_text(tokenizer) -> str | None:
    """The text the chat template writes right after an assistant's reply (``<|im_end|>`` for
    ChatML, ``<|eot_id|>`` for Llama 3), or None when it writes none (or only whitespace).

    Found by rendering a one-exchange conversation; the first whitespace-separated piece
    after the reply is the end-of-turn marker.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _TURN_SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse this conversation; then nothing is known
        return None
    if not isinstance(text, str) or _TURN_SENTINEL not in text:
        return None
    after = text.split(_TURN_SENTINEL, 1)[1].split()
    return after[0] if after else None


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the model's ``generation_config.eos_token_id`` (an id or a
    list), the tokenizer's ``eos_token_id``, and the chat template's end-of-turn marker when
    it is one token. First occurrence order, no repeats.
    """
    ids: list[int] = []

    def add(value) -> None:
        if value is None:
            return
        for tid in ([value] if isinstance(value, int) else list(value)):
            if tid is not None and int(tid) not in ids:
                ids.append(int(tid))

    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(tokenizer.eos_token_id)
    marker = end_of_turn_text(tokenizer)
    if marker:
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1:
            add(marker_ids[0])
    return ids


def _stop_strings(tokenizer, stop_ids: Sequence[int]) -> list[str]:
    """The text of every stop token and of the end-of-turn marker (for cutting decoded text)."""
    texts = {tokenizer.decode([tid], skip_special_tokens=False) for tid in stop_ids}
    marker = end_of_turn_text(tokenizer)
    if marker:
        texts.add(marker)
    return sorted((t for t in texts if t.strip()), key=len, reverse=True)


def decode_reply(tokenizer, token_ids: Sequence[int], stop_ids: Sequence[int], stop_texts: Sequence[str]) -> str:
    """A reply's text: tokens up to the first stop id (padding after it dropped), special
    tokens skipped, and cut at the first stop text (an end-of-turn marker the tokenizer
    does not treat as special)."""
    ids = [int(t) for t in token_ids]
    stops = set(stop_ids)
    for i, tid in enumerate(ids):
        if tid in stops:
            ids = ids[:i]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for marker in stop_texts:
        text = text.split(marker, 1)[0]
    return text


def generate_replies(
    model,
    tokenizer,
    conversations: Sequence[list[dict[str, str]]],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    advance: Advance | None = None,
) -> list[str]:
    """Greedy replies to chat conversations (chat template applied), decoded as text.

    Generation stops at any of :func:`stop_token_ids` (the model's generation-config eos
    ids, a list for chat models that end a turn with e.g. ``<|im_end|>``); the reply is
    decoded by :func:`decode_reply`, so it never contains the end-of-turn token.
    """
    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise SfmError(
            f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat template; "
            "use --mode logprob for base models"
        )
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    stop_ids = stop_token_ids(model, tokenizer)
    stop_texts = _stop_strings(tokenizer, stop_ids)
    encoded = [
        list(tokenizer(_render_chat(tokenizer, conv), add_special_tokens=False)["input_ids"]) for conv in conversations
    ]
    order = sorted(range(len(encoded)), key=lambda j: -len(encoded[j]))
    replies: list[str] = [""] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = _left_pad([encoded[j] for j in batch], pad_id, device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=stop_ids or None,
            )
            new = out[:, ids.shape[1]:].cpu()
            for row, j in enumerate(batch):
                replies[j] = decode_reply(tokenizer, new[row].tolist(), stop_ids, stop_texts)
            if advance is not None:
                advance(len(batch))
    return replies
