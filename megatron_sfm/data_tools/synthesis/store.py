"""Resumable output of a synthesis job.

Layout of ``--out``::

    shard-00000.jsonl.zst ...   kept documents (complete shards only; moved here at the end)
    manifest.json               written last: the job is complete when it exists
    .synth/job.json             what the job is (a rerun must match it)
    .synth/shards/*.jsonl.zst   closed shards of a running job
    .synth/part.jsonl           the open shard: one JSON line per kept document
    .synth/outcomes.jsonl       one line per rejected or failed request

Every line is written and flushed as soon as its reply is checked, so a ``kill -9``
loses at most the requests in flight; on restart a partial last line is discarded, lines
already in a closed shard are dropped from the open part, and every id found anywhere is
not requested again (a *failed* request is: that is what a rerun is for).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from megatron_sfm.errors import SfmError

STATE_DIR = ".synth"
JOB = "job.json"
PART = "part.jsonl"
OUTCOMES = "outcomes.jsonl"
MANIFEST = "manifest.json"


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """Complete JSON lines of ``path`` and the byte length they cover (a torn tail is dropped)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records, good = [], 0
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # no newline: the last write was cut
        line = data[pos:end]
        try:
            rec = json.loads(line)
        except ValueError:
            break  # a torn line can only be the last one written
        if isinstance(rec, dict):
            records.append(rec)
        pos = end + 1
        good = pos
    return records, good


def _shard_records(path: Path) -> Iterator[dict]:
    from megatron_sfm.data_tools.documents import iter_jsonl_lines

    for _, line in iter_jsonl_lines(path):
        if line.strip():
            yield json.loads(line)


@dataclass
class Resumed:
    kept_ids: set = field(default_factory=set)
    kept_texts: list = field(default_factory=list)  # texts of kept documents (only without resume's on_kept)
    outcomes: dict = field(default_factory=dict)  # id -> last outcome record
    prompt_tokens: int = 0
    completion_tokens: int = 0
    torn_lines: int = 0


class Store:
    """Writes kept documents and outcomes; closes a shard every ``shard_docs`` documents."""

    def __init__(self, out: Path, shard_docs: int = 10000):
        self.out = Path(out)
        self.state = self.out / STATE_DIR
        self.shards = self.state / "shards"
        self.shard_docs = shard_docs
        self._part = None
        self._outcomes = None
        self._part_count = 0

    # ---- job identity -----------------------------------------------------------------
    def check_job(self, job: dict, *, overwrite: bool) -> None:
        """Create the folder for ``job`` or accept it when it holds the same job (a resume)."""
        import shutil

        if self.out.exists() and not self.out.is_dir():
            raise SfmError(f"--out {self.out}: exists and is not a folder")
        job_file = self.state / JOB
        if self.out.exists() and any(self.out.iterdir()):
            if overwrite:
                shutil.rmtree(self.out)
            elif not job_file.exists():
                raise SfmError(f"--out {self.out}: not empty and not a synthesis job folder; "
                               "pass --overwrite to replace it")
            else:
                old = json.loads(job_file.read_text(encoding="utf-8"))
                diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
                if diff:
                    raise SfmError(f"--out {self.out}: holds another synthesis job ({diff[0]} differs: "
                                   f"{old.get(diff[0])!r} vs {job.get(diff[0])!r}); pass --overwrite or "
                                   "another --out")
        self.shards.mkdir(parents=True, exist_ok=True)
        tmp = job_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(job, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, job_file)

    # ---- resume ---------------------------------------------------------------------------
    def closed_shards(self) -> list[Path]:
        return sorted(self.out.glob("shard-*.jsonl.zst")) + sorted(self.shards.glob("shard-*.jsonl.zst"))

    def resume(self, on_kept: Optional[Callable[[str], object]] = None) -> Resumed:
        """Read what earlier runs left; repair the open part (torn tail, lines already closed).

        ``on_kept`` is called with the text of every kept document, in order, as it is read
        (the run rebuilds its duplicate index so, streaming: no list of every text); without
        it the texts are collected in ``kept_texts``.
        """
        r = Resumed()
        for shard in self.closed_shards():
            for rec in _shard_records(shard):
                self._remember(r, rec, on_kept)
        part = self.state / PART
        records, good = _read_lines(part)
        if part.exists() and good != part.stat().st_size:
            r.torn_lines += 1
        fresh = [rec for rec in records if rec.get("id") not in r.kept_ids]
        if part.exists() and (len(fresh) != len(records) or good != part.stat().st_size):
            tmp = part.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                for rec in fresh:
                    f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
            os.replace(tmp, part)
        for rec in fresh:
            self._remember(r, rec, on_kept)
        self._part_count = len(fresh)
        outcomes = self.state / OUTCOMES
        records, good = _read_lines(outcomes)
        if outcomes.exists() and good != outcomes.stat().st_size:
            r.torn_lines += 1
            with open(outcomes, "r+b") as f:
                f.truncate(good)
        for rec in records:
            if rec.get("id") not in r.kept_ids:
                r.outcomes[rec["id"]] = rec
            # a rejected reply's tokens were spent too (failed requests carry no usage)
            usage = rec.get("usage") or {}
            r.prompt_tokens += int(usage.get("prompt_tokens", 0))
            r.completion_tokens += int(usage.get("completion_tokens", 0))
        return r

    @staticmethod
    def _remember(r: Resumed, rec: dict, on_kept: Optional[Callable[[str], object]]) -> None:
        r.kept_ids.add(rec["id"])
        if on_kept is not None:
            on_kept(rec["text"])
        else:
            r.kept_texts.append(rec["text"])
        usage = rec.get("usage") or {}
        r.prompt_tokens += int(usage.get("prompt_tokens", 0))
        r.completion_tokens += int(usage.get("completion_tokens", 0))

    # ---- writing --------------------------------------------------------------------------
    def open(self) -> None:
        self._part = open(self.state / PART, "ab")
        self._outcomes = open(self.state / OUTCOMES, "ab")

    def keep(self, doc: dict) -> None:
        self._part.write(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
        self._part.flush()
        self._part_count += 1
        if self._part_count >= self.shard_docs:
            self._close_part()
            self._part = open(self.state / PART, "ab")

    def outcome(self, rec: dict) -> None:
        self._outcomes.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        self._outcomes.flush()

    def _next_shard_name(self) -> str:
        return f"shard-{len(self.closed_shards()):05d}.jsonl.zst"

    def _close_part(self) -> None:
        """Compress the open part into a closed shard (temp name, fsync, rename), then drop it."""
        import zstandard

        if self._part is not None:
            self._part.close()
            self._part = None
        part = self.state / PART
        if not part.exists() or part.stat().st_size == 0:
            part.unlink(missing_ok=True)
            self._part_count = 0
            return
        final = self.shards / self._next_shard_name()
        tmp = final.with_name("." + final.name + ".tmp")
        with open(part, "rb") as src, open(tmp, "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, final)
        part.unlink()
        self._part_count = 0

    def close(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None
        if self._outcomes is not None:
            self._outcomes.close()
            self._outcomes = None

    def finish(self, manifest: dict) -> list[Path]:
        """Close the open part, move closed shards into ``--out``, write ``manifest.json`` last."""
        self.close()
        self._close_part()
        moved = []
        for shard in sorted(self.shards.glob("shard-*.jsonl.zst")):
            final = self.out / f"shard-{len(list(self.out.glob('shard-*.jsonl.zst'))):05d}.jsonl.zst"
            os.replace(shard, final)
            moved.append(final)
        manifest = dict(manifest, shards=[p.name for p in sorted(self.out.glob("shard-*.jsonl.zst"))])
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        os.replace(tmp, self.out / MANIFEST)
        return moved

    def drop_manifest(self) -> None:
        """A rerun that adds work makes the job incomplete again until it finishes."""
        (self.out / MANIFEST).unlink(missing_ok=True)


def read_outcome_counts(outcomes: dict) -> tuple[dict, int]:
    """Rejections by reason and the number of failed requests, from the last outcome per id."""
    rejected: dict[str, int] = {}
    failed = 0
    for rec in outcomes.values():
        if rec.get("status") == "rejected":
            rejected[rec["reason"]] = rejected.get(rec["reason"], 0) + 1
        elif rec.get("status") == "failed":
            failed += 1
    return rejected, failed


def manifest_of(out: Path) -> Optional[dict]:
    path = Path(out) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
