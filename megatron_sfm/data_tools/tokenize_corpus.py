"""Tokenize document shards into Megatron-Core's indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

Output is byte-identical to Megatron-LM's ``tools/preprocess_data.py`` (tag
core_v0.16.1, document level, ``--append-eod``) for the same input and tokenizer:

* one sequence per document: its ids followed by the EOD id;
* a document whose text encodes to no tokens is recorded as a document with no
  sequence and no EOD (what ``Encoder.encode`` + ``add_document`` do for it);
* token dtype ``uint16`` when the tokenizer's vocabulary (added tokens included) has
  fewer than 65500 ids, else ``int32`` (``DType.optimal_dtype``);
* written by :class:`indexed.IndexWriter` (default ``writer="numpy"``: numpy only, no
  Megatron-Core or torch import, byte-identical to Megatron-Core's
  ``IndexedDatasetBuilder``, tested), or with ``writer="megatron"`` through
  ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` itself.

Next to the pair, ``PREFIX.stats.json`` (see :func:`tokenize_to_indexed`) records the
counts, dtype and largest token id, computed while tokenizing.

Work is split into chunks of consecutive lines (about ``chunk_bytes`` each) that worker
processes parse (orjson) and encode; the parent writes results in input order, so the
files are the same for any number of workers. Workers are forked right after the
tokenizer is loaded and import nothing heavy (gigatoken is called per document, which
returns numpy arrays, so awkward and the pyarrow it imports are never loaded); with the
Megatron writer the parent imports Megatron-Core (and torch) in a background thread while
the first chunks are encoded.

Files are written under temporary names and renamed only when complete: an existing
``.idx`` is removed first, then ``.bin``, ``.stats.json`` and last ``.idx`` are put in
place, so an interrupted run never leaves a matching ``.bin``/``.idx`` pair behind, and a
``.idx`` always has the ``.stats.json`` of its own run.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from megatron_sfm.errors import SfmError

DEFAULT_CHUNK_BYTES = 1 << 20
# Room for a chunk's tokens: a chunk is chunk_bytes plus the rest of its last line, a
# byte-level BPE gives at most one token per byte of text, and a JSON line's syntax leaves
# room for its EOD; a chunk that still does not fit is handled (a new array in one worker,
# the result pipe with several).
_SLOT_MARGIN_TOKENS = 1 << 20


@dataclass
class Chunk:
    """Consecutive documents of one shard.

    Plain JSONL: a byte range (``offset``, ``nbytes``) that the worker reads itself.
    Compressed JSONL: the decompressed lines in ``data``. Parquet: the texts in ``data``,
    ``first_row`` the 1-based row of the first one.
    """

    source: str
    nbytes: int
    offset: int = 0
    data: bytes | list[str] | None = None
    first_row: int = 1


@dataclass
class Encoded:
    """A chunk's tokens: flat ids (EOD included) and per-document token counts.

    Line numbers are relative to the chunk (0-based); the parent, which sees chunks in
    order, turns them into file line numbers with ``newlines`` of the earlier chunks.
    """

    tokens: np.ndarray
    lengths: np.ndarray  # per document, EOD included; 0 for a document with no tokens
    input_bytes: int
    newlines: int = 0
    bad_lines: list[int] = field(default_factory=list)
    error: tuple[int, str] | None = None  # (line in chunk, message) of the first bad line
    max_id: int = -1  # largest token id in ``tokens`` (-1: none)


def iter_chunks(shards: list[Path], text_key: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Cut every shard into chunks of whole lines (JSONL) or rows (Parquet), in order."""
    from megatron_sfm.data_tools import documents as docs

    for shard in shards:
        source = str(shard)
        fmt = docs.shard_format(shard)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(shard)
            if text_key not in pf.schema_arrow.names:
                raise SfmError(f"{shard}: no column {text_key!r}")
            row = 1
            for batch in pf.iter_batches(batch_size=8192, columns=[text_key]):
                texts = batch.column(0).to_pylist()
                for i, t in enumerate(texts):
                    if not isinstance(t, str):
                        raise SfmError(f"{shard}:{row + i}: key {text_key!r} is {type(t).__name__}, not a string")
                yield Chunk(source, sum(len(t) for t in texts), data=texts, first_row=row)
                row += len(texts)
        elif fmt == "jsonl":
            # only find line-aligned boundaries here; workers read their own ranges
            size = shard.stat().st_size
            with open(shard, "rb") as f:
                pos = 0
                while pos < size:
                    f.seek(min(size, pos + chunk_bytes))
                    f.readline()
                    end = min(size, f.tell())
                    yield Chunk(source, end - pos, offset=pos)
                    pos = end
        else:
            with docs.open_binary(shard, "rb") as f:
                while True:
                    block = f.read(chunk_bytes)
                    if not block:
                        break
                    if not block.endswith(b"\n"):
                        block += _readline(f)
                    yield Chunk(source, len(block), data=block)


def _readline(f) -> bytes:
    """The rest of the current line from a binary stream (works for zstd readers without readline)."""
    if hasattr(f, "readline"):
        try:
            return f.readline()
        except (AttributeError, OSError, NotImplementedError):  # zstandard stream readers
            pass
    out = bytearray()
    while True:
        b = f.read(1)
        if not b:
            break
        out += b
        if b == b"\n":
            break
    return bytes(out)


# Worker-process state, set in the parent before the pool forks (see _set_worker_state).
_TOK = None
_CFG: dict[str, Any] = {}


def _set_worker_state(tokenizer, cfg: dict[str, Any]) -> None:
    """Set before the pool forks, so workers inherit the loaded tokenizer (no reload per worker)."""
    global _TOK, _CFG
    _TOK, _CFG = tokenizer, cfg


def encode_chunk(chunk: Chunk, out: np.ndarray | None = None) -> Encoded:
    """Parse and encode one chunk (in a worker). Bad lines are reported, not raised, so
    that the parent can name the file line.

    With ``out`` (a 1-D array of the output dtype), the tokens are written into it when
    they fit (``Encoded.tokens`` is then a view of ``out``), else into a new array.
    """
    text_key, skip_bad, append_eod, dtype = _CFG["text_key"], _CFG["skip_bad_lines"], _CFG["append_eod"], _CFG["dtype"]
    bad: list[int] = []
    newlines = 0
    if isinstance(chunk.data, list):
        texts = chunk.data
    else:
        raw = chunk.data
        if raw is None:
            with open(chunk.source, "rb") as f:
                f.seek(chunk.offset)
                raw = f.read(chunk.nbytes)
        texts, newlines, bad, error = _parse_lines(raw, text_key, skip_bad)
        if error is not None:
            return Encoded(np.zeros(0, dtype), np.zeros(0, np.int64), chunk.nbytes, newlines, bad, error)
    arrays = _TOK.encode_arrays(texts)
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    if append_eod:
        eod = np.array([_CFG["eod_id"]], np.uint32)
        parts = []
        for a in arrays:
            if len(a):  # a document with no tokens gets no EOD (and no sequence)
                parts.append(a)
                parts.append(eod)
        lengths += lengths > 0
    else:
        parts = arrays
    total = int(lengths.sum())
    if out is not None and total <= len(out):
        flat = out[:total]
    else:
        flat = np.empty(total, dtype)
    if total:
        np.concatenate(parts, out=flat, casting="unsafe")  # ids < 2**16 (uint16) or < 2**31 (int32)
    max_id = int(flat.max()) if total else -1
    return Encoded(flat, lengths, chunk.nbytes, newlines, bad, max_id=max_id)


_UNPARSED = object()


def _parse_lines(raw: bytes, text_key: str, skip_bad: bool) -> tuple[list[str], int, list[int], tuple[int, str] | None]:
    """The ``text_key`` strings of a block of JSONL lines: (texts, newline count, bad line
    numbers, first error). Line numbers are 0-based within the block; blank lines are skipped.

    Lines are parsed in place (memoryview slices at the newline positions numpy finds), with
    orjson; Python's json (which also takes NaN, BOMs, UTF-16, lone surrogates) decides and
    words the error when orjson refuses a line.
    """
    view = memoryview(raw)
    ends = np.flatnonzero(np.frombuffer(raw, np.uint8) == 10).tolist()
    newlines = len(ends)
    if not raw.endswith(b"\n"):
        ends.append(len(raw))
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    texts: list[str] = []
    bad: list[int] = []
    start = 0
    for i, end in enumerate(ends):
        line = view[start:end]
        start = end + 1
        if not line:
            continue
        try:
            doc = loads(line)
        except decode_error:
            data = bytes(line)
            if data.isspace():
                continue
            try:
                doc = json.loads(data)
            except ValueError as exc:  # UnicodeDecodeError included
                doc, what = _UNPARSED, f"invalid JSON ({exc})"
        else:
            text = doc.get(text_key) if type(doc) is dict else None
            if type(text) is str:  # the common case
                texts.append(text)
                continue
        if doc is not _UNPARSED:
            if not isinstance(doc, dict):
                what = f"expected a JSON object, got {type(doc).__name__}"
            elif text_key not in doc:
                what = f"no key {text_key!r}"
            elif not isinstance(doc[text_key], str):
                what = f"key {text_key!r} is {type(doc[text_key]).__name__}, not a string"
            else:
                texts.append(doc[text_key])
                continue
        if skip_bad:
            bad.append(i)
            continue
        return texts, newlines, bad, (i, what)
    return texts, newlines, bad, None


def _encode_into(task: tuple[Chunk, dict[str, Any]], out: np.ndarray) -> tuple[tuple[str, Encoded], int | None]:
    """Worker side of :class:`tokenize_pool.SlotPool`: the tokens stay in ``out`` (shared
    bytes) when they fit, and the parent is told how many bytes they take."""
    global _CFG
    chunk, _CFG = task
    dtype = np.dtype(_CFG["dtype"])
    view = out[: len(out) - len(out) % dtype.itemsize].view(dtype)
    enc = encode_chunk(chunk, view)
    if enc.tokens.size and np.may_share_memory(enc.tokens, view):
        nbytes, enc.tokens = enc.tokens.nbytes, None
        return (chunk.source, enc), nbytes
    return (chunk.source, enc), None


def _warm_up() -> None:
    """gigatoken's first encode in a process sets itself up (about 0.05 s); workers do it
    at once, while the parent is still reading the vocabulary."""
    _TOK.encode_arrays(["warm up"])


def _add_index_entries(builder, lengths: np.ndarray) -> None:
    """The index half of :func:`add_documents` (the tokens were written to ``builder.data_file``)."""
    nonempty = lengths > 0
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths[nonempty].tolist())
    builder.document_indices.extend((offset + np.cumsum(nonempty)).tolist())


def add_documents(builder, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Append documents to a Megatron ``IndexedDatasetBuilder`` in one write.

    Same result as one ``builder.add_document(doc_tokens, [len] or [])`` per document
    (what preprocess_data.py does; a document with no tokens gets no sequence), done as
    Megatron-LM main's ``IndexedDatasetBuilder.add_documents`` does it (not in 0.16.1):
    one write of the flat tokens, then the sequence lengths and document indices.
    """
    builder.data_file.write(np.ascontiguousarray(tokens, dtype=builder.dtype).tobytes(order="C"))
    _add_index_entries(builder, lengths)


def tokenize_to_indexed(
    inputs: list[str | os.PathLike],
    tokenizer_path: str | os.PathLike,
    out_prefix: str | os.PathLike,
    *,
    workers: int = 1,
    text_key: str = "text",
    skip_bad_lines: bool = False,
    append_eod: bool = True,
    backend: str = "auto",
    eod_token: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    writer: str = "numpy",
) -> dict[str, Any]:
    """Tokenize ``inputs`` (shards or folders) into ``out_prefix.bin/.idx`` and
    ``out_prefix.stats.json``; return a summary dict.

    Summary keys: ``documents``, ``empty_documents``, ``tokens`` (EOD included),
    ``max_token_id``, ``bad_lines``, ``input_bytes``, ``seconds``, ``dtype``,
    ``vocab_size``, ``eod_id``, ``backend``, ``workers``, ``prefix``, ``writer``.

    ``writer``: ``"numpy"`` (default) writes with :class:`indexed.IndexWriter` without
    importing Megatron-Core or torch; ``"megatron"`` goes through
    ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` (imported in a
    background thread while the first chunks encode). The files are the same (tested).

    ``PREFIX.stats.json`` (written atomically, before the ``.idx`` is put in place):
    ``num_documents``, ``num_sequences``, ``num_tokens`` (EOD included), ``max_token_id``
    (EOD included; -1 when there are no tokens), ``dtype``, ``vocab_size``, ``eod_id``,
    ``append_eod``, ``tokenizer`` (absolute path of the tokenizer file), ``empty_documents``.
    """

    from megatron_sfm.data_tools import documents as docs
    from megatron_sfm.data_tools.indexed import IndexWriter, optimal_dtype, stats_path
    from megatron_sfm.data_tools.tokenizer import load_tokenizer

    if writer not in ("numpy", "megatron"):
        raise SfmError(f"unknown writer {writer!r} (numpy or megatron)")
    start = time.perf_counter()
    shards = docs.expand_inputs(inputs)
    out_prefix = str(out_prefix)
    tmp_bin = _tmp_name(out_prefix + ".bin")
    tmp_idx = _tmp_name(out_prefix + ".idx")
    tmp_stats = _tmp_name(stats_path(out_prefix))
    _check_out_prefix(out_prefix, tmp_bin)  # before any work: a bad --out fails at once
    tok = load_tokenizer(tokenizer_path, backend=backend, eod_token=eod_token, defer_vocab=workers > 1)
    _set_worker_state(tok, {})
    total_bytes = sum(s.stat().st_size for s in shards)

    slot_tokens = chunk_bytes + _SLOT_MARGIN_TOKENS
    pool = None
    if workers > 1:
        from megatron_sfm.data_tools.tokenize_pool import SlotPool

        # Fork right after the tokenizer is loaded (nothing heavy is imported, so workers
        # stay light); the workers warm gigatoken up while this process reads the vocabulary.
        pool = SlotPool(workers, slot_tokens * 4, _encode_into, warm_up=_warm_up)
    try:
        tok.read_vocab()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    dtype = optimal_dtype(tok.vocab_size)
    cfg = {"text_key": text_key, "skip_bad_lines": skip_bad_lines, "append_eod": append_eod, "dtype": dtype,
           "eod_id": tok.eod_id}
    _set_worker_state(tok, cfg)
    chunks = iter_chunks(shards, text_key, chunk_bytes)
    if pool is not None:
        results = ((src, enc, data) for _, (src, enc), data in pool.imap((chunk, cfg) for chunk in chunks))
    else:
        results = _encode_in_process(chunks, np.empty(slot_tokens, dtype))

    megatron: dict[str, Any] = {}
    if writer == "megatron":
        importer = threading.Thread(target=_import_indexed_dataset, args=(megatron,), daemon=True)
        importer.start()

    summary = {"documents": 0, "empty_documents": 0, "tokens": 0, "max_token_id": -1, "bad_lines": 0, "input_bytes": 0}
    bad_examples: list[str] = []
    try:
        with _TokenizeProgress(progress, total_bytes) as bar:
            first = next(results, None)
            if writer == "megatron":
                importer.join()
                if "error" in megatron:
                    raise megatron["error"]
                indexed_dataset = megatron["module"]
                assert indexed_dataset.DType.optimal_dtype(tok.vocab_size) == dtype
                builder = indexed_dataset.IndexedDatasetBuilder(tmp_bin, dtype=dtype)
                add_index = functools.partial(_add_index_entries, builder)
            else:
                builder = IndexWriter(tmp_bin, dtype)
                add_index = builder.add_lengths
            chain = [first] if first is not None else []
            lines_done: dict[str, int] = {}
            for chunk_source, enc, data in _chain(chain, results):
                base = lines_done.get(chunk_source, 0)
                if enc.error is not None:
                    line, what = enc.error
                    raise SfmError(f"{chunk_source}:{base + line + 1}: {what}")
                builder.data_file.write((enc.tokens if data is None else data).data)
                add_index(enc.lengths)
                ndocs = len(enc.lengths)
                summary["empty_documents"] += int((enc.lengths == 0).sum())
                summary["documents"] += ndocs
                summary["tokens"] += int(enc.lengths.sum())
                summary["max_token_id"] = max(summary["max_token_id"], enc.max_id)
                summary["bad_lines"] += len(enc.bad_lines)
                summary["input_bytes"] += enc.input_bytes
                bad_examples += [f"{chunk_source}:{base + i + 1}" for i in enc.bad_lines[: max(0, 5 - len(bad_examples))]]
                lines_done[chunk_source] = base + enc.newlines
                bar.advance(enc.input_bytes, ndocs)
            builder.finalize(tmp_idx)
        stats = {
            "num_documents": summary["documents"],
            "num_sequences": summary["documents"] - summary["empty_documents"],
            "num_tokens": summary["tokens"],
            "max_token_id": summary["max_token_id"],
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "append_eod": append_eod,
            "tokenizer": str(Path(tok.path).resolve()),
            "empty_documents": summary["empty_documents"],
        }
        with open(tmp_stats, "w", encoding="utf-8") as f:
            f.write(json.dumps(stats, indent=2) + "\n")
        # Put the new files in place: drop any old index first, then .bin and .stats.json,
        # and .idx last (a reader that finds the .idx finds the rest of its run).
        Path(out_prefix + ".idx").unlink(missing_ok=True)
        os.replace(tmp_bin, out_prefix + ".bin")
        os.replace(tmp_stats, stats_path(out_prefix))
        os.replace(tmp_idx, out_prefix + ".idx")
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool = None
        for p in (tmp_bin, tmp_idx, tmp_stats):
            Path(p).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
    summary.update(
        {
            "seconds": time.perf_counter() - start,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "backend": tok.backend,
            "workers": workers,
            "prefix": out_prefix,
            "writer": writer,
            "bad_line_examples": bad_examples,
        }
    )
    return summary


def _encode_in_process(chunks: Iterator[Chunk], out: np.ndarray) -> Iterator[tuple[str, Encoded, None]]:
    """One worker: encode in this process, into one reused buffer (``out``)."""
    for chunk in chunks:
        yield chunk.source, encode_chunk(chunk, out), None


def _chain(first: list, rest):
    yield from first
    yield from rest


def _tmp_name(final: str) -> str:
    p = Path(final)
    return str(p.with_name(f".{p.name}.{os.getpid()}.tmp"))


def _check_out_prefix(out_prefix: str, tmp_bin: str) -> None:
    """Make the prefix's folder and check that files can be written there; one-line SfmError if not."""
    name = os.path.basename(out_prefix)
    if not name or name in (".", ".."):
        raise SfmError(f"--out {out_prefix!r}: give a file prefix (writes PREFIX.bin, PREFIX.idx), not a folder")
    folder = Path(out_prefix).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SfmError(f"--out {out_prefix}: cannot create the folder {folder} ({exc.strerror or exc})") from None
    try:
        with open(tmp_bin, "wb"):
            pass
    except OSError as exc:
        raise SfmError(f"--out {out_prefix}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.unlink(tmp_bin)


def _import_indexed_dataset(out: dict) -> None:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
        out["module"] = indexed_dataset
    except BaseException as exc:  # surfaced in the main thread
        out["error"] = exc


class _TokenizeProgress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.docs, self.t0 = enabled, total, 0, time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

            self._p = Progress(TextColumn("[bold]tokenize"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                               TextColumn("{task.fields[docs]:,} docs ({task.fields[rate]:,.0f} docs/s)"), TimeElapsedColumn())
            self._p.__enter__()
            self._task = self._p.add_task("tokenize", total=self.total, docs=0, rate=0.0)
        return self

    def advance(self, nbytes: int, ndocs: int) -> None:
        self.docs += ndocs
        if self.enabled:
            rate = self.docs / max(1e-9, time.perf_counter() - self.t0)
            self._p.update(self._task, advance=nbytes, docs=self.docs, rate=rate)

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)
        return False


def summary_table(summary: dict[str, Any]):
    """A rich Table for a tokenize summary."""
    from rich.table import Table

    table = Table(title=f"tokenize -> {summary['prefix']}.bin/.idx")
    table.add_column("what")
    table.add_column("value", justify="right")
    secs = max(summary["seconds"], 1e-9)
    rows = [
        ("documents", f"{summary['documents']:,}"),
        ("empty documents (no tokens)", f"{summary['empty_documents']:,}"),
        ("tokens (EOD included)", f"{summary['tokens']:,}"),
        ("skipped bad lines", f"{summary['bad_lines']:,}"),
        ("input bytes", f"{summary['input_bytes']:,}"),
        ("dtype / vocab size / EOD id", f"{summary['dtype']} / {summary['vocab_size']} / {summary['eod_id']}"),
        ("backend / workers / writer", f"{summary['backend']} / {summary['workers']} / {summary.get('writer', 'megatron')}"),
        ("seconds", f"{secs:.2f}"),
        ("throughput", f"{summary['input_bytes'] / secs / 1e6:.1f} MB/s, {summary['documents'] / secs:,.0f} docs/s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table
