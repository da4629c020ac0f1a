"""Post-training data: read and check local files, convert them to TRL's formats, mix them.

Files: JSONL (``.jsonl``/``.json``, optionally ``.gz`` or ``.zst``) or Parquet, one
example per line or row, read through :mod:`megatron_sfm.data_tools.documents`. Other
fields of a row are ignored.

SFT example (conversational, what ``SFTTrainer`` trains on)::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

Roles are system (first message only), user and assistant; contents are non-empty
strings; at least one message is the assistant's (the loss is on assistant turns).

DPO example, either form:

- ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (strings): the prompt becomes
  one user message, each response one assistant message;
- ``{"chosen": [messages], "rejected": [messages]}`` with an optional ``"prompt": [messages]``
  (or a prompt string, one user message). Without a prompt, the prompt is the longest
  run of messages the two conversations share from the start; with one, chosen and
  rejected are the responses, or whole conversations that begin with the prompt (the
  prompt is then cut off them).

Both become DPOTrainer's conversational form: ``prompt`` (messages, the last not the
assistant's), ``chosen`` and ``rejected`` (messages ending with the assistant's), so
the chat template renders every pair the same way as the SFT data.

Mixing (``--data FILE:WEIGHT``): a file of ``n`` examples with weight ``w`` contributes
``k = floor(w * n + 0.5)`` examples per epoch: ``k // n`` full copies of the file plus
``k % n`` examples drawn without replacement (the first ``k % n`` of a permutation from
``numpy.random.default_rng([seed, file_index])``, kept in file order). Files are
concatenated in the order given; the trainer shuffles the whole mix each epoch with the
run's seed. So weight 1 is each example once per epoch, 2 twice, 0.5 a fixed half; the
same files, weights and seed always give the same mix.

Any bad example is a one-line :class:`SfmError` ``FILE:LINE: KEY: problem`` (LINE is the
row for Parquet), raised while reading, before a model is loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.posttrain.chat_template import ROLES
from megatron_sfm.posttrain.config import DataFile

SFT_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
DPO_EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."} or {"chosen": [messages], "rejected": [messages]}'


@dataclass
class FileStats:
    """One data file as read and mixed (for the manifest and the summary)."""

    path: str
    weight: float
    rows: int  # examples in the file
    examples: int  # examples it contributes to one epoch of the mix
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mix_count(rows: int, weight: float) -> int:
    """Examples per epoch from a file of ``rows`` examples at ``weight``: floor(w * n + 0.5)."""
    return int(weight * rows + 0.5)


def mix_indices(rows: int, weight: float, seed: int, file_index: int) -> list[int]:
    """Which rows of one file (0-based, repeated for weights above 1) enter one epoch of the mix."""
    import numpy as np

    count = mix_count(rows, weight)
    copies, rest = divmod(count, rows)
    picked: list[int] = list(range(rows)) * copies
    if rest:
        perm = np.random.default_rng([seed, file_index]).permutation(rows)
        picked += sorted(int(i) for i in perm[:rest])
    return picked


# --- checks -------------------------------------------------------------------------------


def _where(record) -> str:
    return f"{record.source}:{record.line}"


def _check_messages(value: Any, where: str, key: str, *, first_may_be_system: bool = True) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise SfmError(f"{where}: {key}: expected a list of {{role, content}} messages, got {type(value).__name__}")
    if not value:
        raise SfmError(f"{where}: {key}: empty list of messages")
    out = []
    for i, message in enumerate(value):
        mkey = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise SfmError(f"{where}: {mkey}: expected a {{role, content}} mapping, got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise SfmError(f"{where}: {mkey}: missing key {field!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise SfmError(f"{where}: {mkey}.role: {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and not (i == 0 and first_may_be_system):
            raise SfmError(f"{where}: {mkey}.role: a system message may only be the first message")
        if not isinstance(content, str):
            raise SfmError(f"{where}: {mkey}.content: expected a string, got {type(content).__name__}")
        if not content.strip():
            raise SfmError(f"{where}: {mkey}.content: empty")
        out.append({"role": role, "content": content})
    return out


def sft_example(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """A checked SFT example ``{"messages": [...]}`` from one row."""
    if "messages" not in doc:
        raise SfmError(f"{where}: no key 'messages' (an SFT example is {SFT_EXAMPLE})")
    messages = _check_messages(doc["messages"], where, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise SfmError(f"{where}: messages: no assistant message (nothing to train on)")
    return {"messages": messages}


def _text(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise SfmError(f"{where}: {key}: expected a string (as the other fields), got {type(value).__name__}")
    if not value.strip():
        raise SfmError(f"{where}: {key}: empty")
    return value


def _response(messages: list[dict[str, str]], where: str, key: str) -> list[dict[str, str]]:
    if not messages:
        raise SfmError(f"{where}: {key}: no response after the prompt")
    if messages[-1]["role"] != "assistant":
        raise SfmError(f"{where}: {key}[{len(messages) - 1}].role: the response must end with an assistant "
                       f"message, got {messages[-1]['role']!r}")
    return messages


def dpo_example(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """A checked DPO example in TRL's conversational form from one row (see the module docstring)."""
    for key in ("chosen", "rejected"):
        if key not in doc:
            raise SfmError(f"{where}: no key {key!r} (a DPO example is {DPO_EXAMPLE})")
    chosen, rejected, prompt = doc["chosen"], doc["rejected"], doc.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        if prompt is None:
            raise SfmError(f"{where}: no key 'prompt' (needed with string chosen/rejected; {DPO_EXAMPLE})")
        prompt_text = _text(doc, "prompt", where)
        return {"prompt": [{"role": "user", "content": prompt_text}],
                "chosen": [{"role": "assistant", "content": _text(doc, "chosen", where)}],
                "rejected": [{"role": "assistant", "content": _text(doc, "rejected", where)}]}
    chosen = _check_messages(chosen, where, "chosen")
    rejected = _check_messages(rejected, where, "rejected")
    if prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise SfmError(f"{where}: chosen/rejected: the two conversations share no prompt messages "
                           f"(give a 'prompt' key, or begin both with the same messages)")
        if shared in (len(chosen), len(rejected)):
            raise SfmError(f"{where}: chosen/rejected: one conversation is the start of the other "
                           f"(no separate responses to compare)")
        prompt_messages = chosen[:shared]
    else:
        if isinstance(prompt, str):
            prompt_messages = [{"role": "user", "content": _text(doc, "prompt", where)}]
        else:
            prompt_messages = _check_messages(prompt, where, "prompt")
        n = len(prompt_messages)
        if chosen[:n] == prompt_messages and rejected[:n] == prompt_messages:
            shared = n  # whole conversations that begin with the prompt
        elif chosen[:n] == prompt_messages or rejected[:n] == prompt_messages:
            which = "chosen" if chosen[:n] == prompt_messages else "rejected"
            raise SfmError(f"{where}: chosen/rejected: only {which} begins with the prompt; give both as "
                           "whole conversations or both as responses")
        else:
            shared = 0
            for key, msgs in (("chosen", chosen), ("rejected", rejected)):
                if msgs[0]["role"] == "system":
                    raise SfmError(f"{where}: {key}[0].role: a system message belongs to the prompt")
    if prompt_messages[-1]["role"] == "assistant":
        raise SfmError(f"{where}: prompt: the prompt must not end with an assistant message")
    return {"prompt": prompt_messages,
            "chosen": _response(chosen[shared:], where, "chosen"),
            "rejected": _response(rejected[shared:], where, "rejected")}


# --- reading ------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def read_examples(path: str | os.PathLike, kind: str) -> list[dict[str, Any]]:
    """Every example of one file, checked and converted (``kind``: "sft" or "dpo")."""
    from megatron_sfm.data_tools.documents import iter_records, shard_format

    p = Path(path)
    if p.is_dir():
        raise SfmError(f"{p}: is a folder; give the data files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet)")
    if not p.is_file():
        raise SfmError(f"{p}: no such file")
    shard_format(p)  # unknown extensions fail here, naming the file
    convert = sft_example if kind == "sft" else dpo_example
    examples = []
    try:
        for record in iter_records(p):
            examples.append(convert(record.doc, _where(record)))
    except SfmError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow and friends: one line naming the file
        raise SfmError(f"{p}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") \
            from None
    if not examples:
        raise SfmError(f"{p}: no examples")
    return examples


def load_examples(files: Iterable[DataFile], kind: str, seed: int) -> tuple[list[dict[str, Any]], list[FileStats]]:
    """Read, check and mix ``files`` (rule in the module docstring): (examples, per-file stats)."""
    mixed: list[dict[str, Any]] = []
    stats: list[FileStats] = []
    for index, item in enumerate(files):
        examples = read_examples(item.path, kind)
        picked = mix_indices(len(examples), item.weight, seed, index)
        if not picked:
            raise SfmError(f"{item.path}: weight {item.weight} gives 0 of its {len(examples)} examples; raise it")
        mixed.extend(examples[i] for i in picked)
        size, digest = file_digest(item.path)
        stats.append(FileStats(str(item.path), item.weight, len(examples), len(picked), size, digest))
    return mixed, stats


def to_dataset(examples: list[dict[str, Any]]):
    """A ``datasets.Dataset`` (in memory) of the examples."""
    from datasets import Dataset

    return Dataset.from_list(examples)
