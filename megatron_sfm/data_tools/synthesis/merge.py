"""One set of shards from several synthesis outputs, without documents an earlier output already holds.

``merge_outputs(folders, out)`` is the cross-task pass of ``sfm launch slurm-data
synthesize``'s merge job: each array task removed duplicates among its own documents;
this pass drops every document that is an exact or near duplicate (the rule of
:class:`~megatron_sfm.data_tools.synthesis.checks.Deduplicator`, same threshold) of a
document kept from an *earlier* folder. Order: folder, then shard name, then line, so the
first copy is the one kept. Shingles are hashed with CRC-32 (not Python's salted hash)
and the permutations are fixed, so a rerun makes the same decisions and writes the same
bytes.

Documents stream through one at a time; what stays in memory is the index (a 64-bit key
per MinHash band and the 16-byte digest of each kept document, in compact tables: about
100-210 bytes per kept document) and one flag per line of the current shard. ``out`` is
built in a temporary sibling and renamed into place. A shard from which nothing is
dropped is hard-linked (copied where links fail), not rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

from megatron_sfm.errors import SfmError

REASONS = ("duplicate", "near_duplicate")


def merge_outputs(folders: Sequence[str | os.PathLike], out: str | os.PathLike, *, threshold: float = 0.8,
                  expected: Optional[Sequence[int]] = None) -> dict:
    """Write the kept documents of ``folders`` (``shard-*.jsonl.zst`` each) to ``out/shard-NNNNN.jsonl.zst``.

    ``expected``: the number of documents each folder's manifest says it kept; a folder
    whose shards hold another number is an error (nothing is written). Returns
    ``documents`` (read), ``kept``, ``dropped`` (by reason), ``per_folder`` (documents
    and kept of each), ``shards`` (names in ``out``, in order), ``linked`` (shards taken
    whole), ``threshold`` and ``hash``.
    """
    from megatron_sfm.data_tools.synthesis.checks import Deduplicator, stable_hash32
    from megatron_sfm.utils.io import atomic_path

    out = Path(out)
    _remove_leftovers(out)
    dedup = Deduplicator(threshold=threshold, hashfunc=stable_hash32)
    stats = {"documents": 0, "kept": 0, "dropped": dict.fromkeys(REASONS, 0), "per_folder": [], "shards": [],
             "linked": 0, "threshold": threshold, "hash": "crc32"}
    with atomic_path(out, is_dir=True) as tmp:
        for group, folder in enumerate(folders):
            before = (stats["documents"], stats["kept"])
            for shard in sorted(Path(folder).glob("shard-*.jsonl.zst")):
                _merge_shard(shard, group, dedup, tmp, stats)
            counts = {"documents": stats["documents"] - before[0], "kept": stats["kept"] - before[1]}
            if expected is not None and counts["documents"] != expected[group]:
                raise SfmError(f"{folder}: manifest.json says {expected[group]} document(s) kept but its shards "
                               f"hold {counts['documents']}; delete the folder and resubmit to rerun that task")
            stats["per_folder"].append(counts)
    return stats


def _remove_leftovers(out: Path) -> None:
    """Hidden siblings a killed earlier merge left (its half-built folder, or the old one mid-swap)."""
    for pattern in (f".{out.name}.*.tmp", f".{out.name}.old.*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _merge_shard(shard: Path, group: int, dedup, out_dir: Path, stats: dict) -> None:
    """Decide every document of ``shard``, then link it whole, write its kept lines, or skip it."""
    keep = _decide(shard, group, dedup, stats)
    kept = sum(keep)
    if not kept:
        return
    dst = out_dir / f"shard-{len(stats['shards']):05d}.jsonl.zst"
    if kept == len(keep):
        _link_or_copy(shard, dst)
        stats["linked"] += 1
    else:
        _write_kept(shard, keep, dst)
    stats["shards"].append(dst.name)


def _decide(shard: Path, group: int, dedup, stats: dict) -> bytearray:
    """One flag per document line of ``shard`` (1: kept); kept documents join the index under ``group``."""
    from megatron_sfm.data_tools.documents import iter_jsonl_lines
    from megatron_sfm.data_tools.synthesis.checks import words

    keep = bytearray()
    for number, line in iter_jsonl_lines(shard):
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise SfmError(f"{shard}:{number}: not a synthesis document (JSON with a 'text')") from None
        reason = dedup.check_and_add(words(text), group)
        stats["documents"] += 1
        if reason is None:
            stats["kept"] += 1
        else:
            stats["dropped"][reason] += 1
        keep.append(reason is None)
    return keep


def _write_kept(shard: Path, keep: bytearray, dst: Path) -> None:
    from megatron_sfm.data_tools.documents import iter_jsonl_lines, open_binary

    with open_binary(dst, "wb") as f:
        for flag, (_, line) in zip(keep, iter_jsonl_lines(shard)):
            if flag:
                f.write(line if line.endswith(b"\n") else line + b"\n")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)
