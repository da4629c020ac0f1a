"""Checks of every dataset a run trains on, before the first step (numpy only, no torch).

Without them, a token id >= ``model.vocab_size`` surfaces as an ``IndexError`` inside the
embedding at the first step, and a truncated ``.bin`` as a ``ValueError`` from a memmap.
:func:`check_datasets` turns both, and a missing or corrupt file, into one line naming
the file:

* the ``.idx`` opens and the ``.bin`` holds exactly ``sum(sequence lengths) * itemsize``
  bytes (``megatron_sfm.data_tools.indexed.read_index``);
* every token id lies in ``[0, vocab_size)``. The largest id comes from the sidecar
  ``PREFIX.stats.json`` that ``sfm data tokenize`` writes (``{"max_token_id",
  "num_tokens", "num_documents", "dtype", ...}``) when its ``num_tokens`` and ``dtype``
  agree with the index; otherwise the ``.bin`` is scanned in chunks (a warning says the
  sidecar would avoid it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_sfm.data_tools.indexed import stats_path
from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

SCAN_CHUNK = 1 << 26  # tokens per numpy reduction (128 MiB of uint16)


@dataclass
class DatasetStats:
    prefix: str
    num_tokens: int
    dtype: str
    min_token_id: Optional[int]  # None: no tokens
    max_token_id: Optional[int]
    from_sidecar: bool


def _read_sidecar(prefix: str, num_tokens: int, dtype: str) -> Optional[dict]:
    """The sidecar's fields if it exists and matches the index (else None, with a warning if stale)."""
    path = stats_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        log.warning("data check: %s is unreadable (%s); scanning %s.bin instead", path, exc, prefix)
        return None
    if not isinstance(data, dict):
        log.warning("data check: %s is not a JSON object; scanning %s.bin instead", path, prefix)
        return None
    max_id = data.get("max_token_id")
    ok = (data.get("num_tokens") == num_tokens and str(data.get("dtype")) == dtype
          and (max_id is None or (isinstance(max_id, int) and not isinstance(max_id, bool))))
    if not ok:
        log.warning("data check: %s does not match %s.idx (num_tokens %r vs %d, dtype %r vs %s): stale; "
                    "scanning %s.bin instead", path, prefix, data.get("num_tokens"), num_tokens, data.get("dtype"),
                    dtype, prefix)
        return None
    if max_id is None and num_tokens:
        return None
    return data


def dataset_stats(prefix: str) -> DatasetStats:
    """Sizes checked, and the smallest and largest token id (sidecar or scan) of one dataset."""
    from megatron_sfm.data_tools.indexed import read_index

    data = read_index(prefix)  # SfmError naming the .idx/.bin: missing, corrupt, or .bin size != index
    num_tokens = data.num_tokens
    dtype = np.dtype(data.dtype).name
    side = _read_sidecar(prefix, num_tokens, dtype)
    if side is not None:
        min_id = side.get("min_token_id")
        if not isinstance(min_id, int) or isinstance(min_id, bool):
            min_id = 0 if np.dtype(data.dtype).kind == "u" else None
        return DatasetStats(prefix, num_tokens, dtype, min_id, side.get("max_token_id"), True)
    tokens = data.tokens
    lo = hi = None
    for start in range(0, int(tokens.shape[0]), SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + SCAN_CHUNK])
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    if num_tokens:
        log.warning("data check: no %s: scanned %d tokens of %s.bin for the largest id (sfm data tokenize "
                    "writes this file and saves the scan)", stats_path(prefix), num_tokens, prefix)
    return DatasetStats(prefix, num_tokens, dtype, lo, hi, False)


def check_datasets(prefixes: Iterable[tuple[str, str]], vocab_size: int) -> list[DatasetStats]:
    """Check each ``(prefix, where)`` once (``where``: the file that names it, for the message).

    Raises SfmError (one line naming the file) on a missing/corrupt ``.idx``, a ``.bin``
    whose size disagrees with the index, or a token id outside ``[0, vocab_size)``.
    """
    seen: dict[str, DatasetStats] = {}
    for prefix, where in prefixes:
        if prefix in seen:
            continue
        try:
            stats = dataset_stats(prefix)
        except SfmError as exc:
            raise SfmError(f"data check: {exc} (a dataset of {where})") from None
        if stats.max_token_id is not None and stats.max_token_id >= vocab_size:
            origin = stats_path(prefix) if stats.from_sidecar else f"{prefix}.bin"
            raise SfmError(f"data check: {prefix}.bin: token id {stats.max_token_id} >= model.vocab_size {vocab_size} "
                           f"(largest id, from {origin}; a dataset of {where}): tokenized with another tokenizer?")
        if stats.min_token_id is not None and stats.min_token_id < 0:
            raise SfmError(f"data check: {prefix}.bin: negative token id {stats.min_token_id} (a dataset of {where})")
        seen[prefix] = stats
    return list(seen.values())
