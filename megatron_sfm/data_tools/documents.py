"""Reading and writing document shards: JSONL, JSONL.gz, JSONL.zst and Parquet.

A shard is one file of documents, one JSON object per line (optionally compressed) or
one Parquet row per document. Readers yield :class:`Record` objects that keep the
original line bytes, so a stage that passes a document through unchanged (the
filter's ``kept`` shards) writes it back byte for byte, every field preserved.

Errors name the file and the 1-based line (JSONL) or row (Parquet).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from megatron_sfm.errors import SfmError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)


def shard_format(path: str | os.PathLike) -> str:
    """The format of a shard from its name: ``jsonl``, ``jsonl.gz``, ``jsonl.zst`` or ``parquet``."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".gz"):
        return "jsonl.gz"
    if name.endswith(".zst") or name.endswith(".zstd"):
        return "jsonl.zst"
    if name.endswith(".jsonl") or name.endswith(".json") or name.endswith(".ndjson"):
        return "jsonl"
    raise SfmError(f"{path}: unknown shard format (expected .jsonl, .jsonl.gz, .jsonl.zst or .parquet)")


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand folders into their shards (sorted), keep files as given, reject missing paths."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_shard(p))
            if not found:
                raise SfmError(f"{path}: folder contains no .jsonl/.jsonl.gz/.jsonl.zst/.parquet shards")
            out.extend(found)
        elif path.is_file():
            shard_format(path)  # validates the suffix
            out.append(path)
        else:
            raise SfmError(f"{path}: no such file or folder")
    if not out:
        raise SfmError("no input shards given")
    return out


def _is_shard(path: Path) -> bool:
    try:
        shard_format(path)
    except SfmError:
        return False
    return not path.name.startswith(".")


def open_binary(path: str | os.PathLike, mode: str = "rb", fmt: str | None = None) -> BinaryIO:
    """Open a (possibly compressed) JSONL shard as a binary stream, reading or writing.

    ``fmt`` overrides the format read from the name (for temporary output names).
    """
    fmt = fmt or shard_format(path)
    if fmt == "jsonl":
        return open(path, mode)
    if fmt == "jsonl.gz":
        # mtime=0 keeps compressed output reproducible byte for byte
        if "w" in mode:
            return gzip.GzipFile(filename="", fileobj=open(path, mode), mode=mode, mtime=0)
        return io.BufferedReader(_GzipReader(path), buffer_size=_READ_BUFFER)
    if fmt == "jsonl.zst":
        import zstandard

        if "w" in mode:
            # the content checksum lets a later read detect corrupted bytes
            return zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(open(path, mode), closefd=True)
        return io.BufferedReader(_ZstdReader(path), buffer_size=_READ_BUFFER)
    raise SfmError(f"{path}: not a JSONL shard")


_READ_BUFFER = 1 << 20
_ZSTD_FEED = 1 << 15  # compressed bytes fed per call: bounds the memory one call can expand to


class _VerifiedReader(io.RawIOBase):
    """A read-only stream of decompressed bytes that is verified to its end.

    Subclasses fill ``_pending`` in ``_more()`` and return False at a verified end of
    the file; any damage (truncation, bad checksum, corrupt data) raises a one-line
    SfmError naming the file, so a damaged shard is never read as a shorter one.
    """

    kind = ""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self._file = open(path, "rb")
        self._pending = memoryview(b"")
        self._done = False

    def _damaged(self, why: str) -> SfmError:
        return SfmError(f"{self.path}: damaged {self.kind} file: {why}")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._done:
                return 0
            self._done = not self._more()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _more(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class _ZstdReader(_VerifiedReader):
    """Zstandard frames one after another, each decoded until the decoder reports its end.

    ``stream_reader(read_across_frames=True)`` returns end-of-file at a cut inside a
    frame as if the data were complete; here a frame that has begun but not ended when
    the file ends is an error, and so is a file with no frame at all.
    """

    kind = "zstd"

    def __init__(self, path: str | os.PathLike):
        import zstandard

        super().__init__(path)
        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = None  # the decoder of the frame in progress
        self._frame = 0  # 1-based number of the frame in progress (or last completed)
        self._input = b""  # compressed bytes not yet fed to a decoder
        self._eof = False

    def _more(self) -> bool:
        while True:
            if not self._input and not self._eof:
                self._input = self._file.read(_ZSTD_FEED)
                self._eof = not self._input
            if not self._input:
                if self._obj is not None:
                    raise self._damaged(f"truncated inside frame {self._frame} (the file ends before the frame does)")
                if self._frame == 0:
                    raise self._damaged("the file is empty (no zstd frame)")
                return False
            if self._obj is None:
                self._obj = self._dctx.decompressobj(read_across_frames=False)
                self._frame += 1
            data, self._input = self._input, b""
            try:
                out = self._obj.decompress(data)
            except self._zstd.ZstdError as exc:
                raise self._damaged(f"frame {self._frame}: {exc}") from None
            if self._obj.eof:
                self._input = self._obj.unused_data
                self._obj = None
            if out:
                self._pending = memoryview(out)
                return True


class _GzipReader(_VerifiedReader):
    """gzip members one after another; the CRC and length trailer of each are checked."""

    kind = "gzip"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        if os.fstat(self._file.fileno()).st_size == 0:
            self._file.close()
            raise self._damaged("the file is empty (no gzip member)")
        self._gz = gzip.GzipFile(fileobj=self._file, mode="rb")

    def _more(self) -> bool:
        try:
            out = self._gz.read(_READ_BUFFER)
        except EOFError:
            raise self._damaged("truncated (the file ends before the end-of-stream marker)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise self._damaged(str(exc)) from None
        if not out:
            return False
        self._pending = memoryview(out)
        return True

    def close(self) -> None:
        if not self.closed and hasattr(self, "_gz"):
            self._gz.close()
        super().close()


@dataclass
class Record:
    """One document: its parsed fields, where it came from, and its original bytes."""

    doc: dict[str, Any]
    source: str
    line: int  # 1-based line (JSONL) or row (Parquet)
    raw: bytes | None = None  # the original JSONL line, line ending included


def iter_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line_bytes)`` for each non-blank line, line ending included."""
    with open_binary(path, "rb") as raw:
        stream = io.BufferedReader(raw, buffer_size=1 << 20) if not isinstance(raw, io.BufferedReader) else raw
        for number, line in enumerate(stream, start=1):
            if not line.isspace():  # (no copy, unlike strip())
                yield number, line


def iter_jsonl_blocks(path: str | os.PathLike, block_bytes: int = 8 << 20) -> Iterator[tuple[int, list[bytes], bool]]:
    """Read a (possibly compressed) JSONL shard in large blocks of whole lines.

    Yields ``(first_line_number, lines, last_terminated)``: ``lines`` are consecutive
    lines without their ``\n`` (a ``\r`` before it stays), numbered from
    ``first_line_number`` (1-based, blank lines counted); ``last_terminated`` is False
    only for the file's last line when it has no ``\n``. Blank lines are included (the
    caller skips them), so numbering matches :func:`iter_jsonl_lines`.
    """
    with open_binary(path, "rb") as f:
        number, rest = 1, b""
        while True:
            data = f.read(block_bytes)
            if not data:
                if rest:
                    yield number, [rest], False
                return
            if rest:
                data = rest + data
            lines = data.split(b"\n")
            rest = lines.pop()  # after the last newline: b"" or a partial line
            if lines:
                yield number, lines, True
                number += len(lines)


def loads_fast(line: bytes, source: str, number: int, terminated: bool = True) -> Any:
    """Parse one JSONL line (without its newline) with orjson; defer to :func:`parse_json_line`
    (Python's ``json``, which accepts a superset: NaN, byte-order marks, UTF-16, lone
    surrogates) when orjson refuses it, so the accepted inputs and error messages are
    exactly those of ``json.loads``.

    Only use the result for values whose parse is the same in both (strings; not numbers:
    orjson 3.8 turns integers past 64 bits into floats). Re-parse with
    :func:`parse_json_line` what will be written back.
    """
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return parse_json_line(line + b"\n" if terminated else line, source, number)


def dumps_line(doc: dict[str, Any]) -> bytes:
    """``json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"``, byte for byte, faster.

    Top-level string values (the long texts) and keys are encoded with orjson, whose
    string escaping equals ``json.dumps(..., ensure_ascii=False)`` for every code point
    (checked over all of Unicode in the tests); everything else goes through ``json``.
    Anything orjson refuses (lone surrogates, non-string keys) takes the plain path.
    """
    try:
        parts = []
        for key, value in doc.items():
            if type(key) is not str:
                raise TypeError
            v = orjson.dumps(value) if type(value) is str else json.dumps(value, ensure_ascii=False).encode("utf-8")
            parts.append(orjson.dumps(key) + b": " + v)
        return b"{" + b", ".join(parts) + b"}\n"
    except TypeError:  # orjson.JSONEncodeError included
        return json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"


def parse_json_line(line: bytes, source: str, number: int) -> dict[str, Any]:
    """Parse one JSONL line into a dict, or raise SfmError naming ``source:number``."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SfmError(f"{source}:{number}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SfmError(f"{source}:{number}: expected a JSON object, got {type(doc).__name__}")
    return doc


def iter_records(path: str | os.PathLike, *, skip_bad_lines: bool = False, bad_lines: list | None = None) -> Iterator[Record]:
    """Yield every document of a shard. Bad JSONL lines raise, or are counted into ``bad_lines``."""
    source = str(path)
    if shard_format(path) == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for doc in batch.to_pylist():
                row += 1
                yield Record(doc, source, row)
        return
    for number, line in iter_jsonl_lines(path):
        try:
            doc = parse_json_line(line, source, number)
        except SfmError:
            if not skip_bad_lines:
                raise
            if bad_lines is not None:
                bad_lines.append((source, number))
            continue
        yield Record(doc, source, number, line)


def text_of(record: Record, text_key: str) -> str:
    """The text field of a document, or SfmError naming file, line and key."""
    try:
        value = record.doc[text_key]
    except KeyError:
        raise SfmError(f"{record.source}:{record.line}: document has no key {text_key!r}") from None
    if not isinstance(value, str):
        raise SfmError(f"{record.source}:{record.line}: key {text_key!r} is {type(value).__name__}, not a string")
    return value


class ShardWriter:
    """Write documents to one shard in a given format (same formats as the readers).

    JSONL records that carry their original bytes and no added fields are written back
    unchanged. Parquet output keeps the input's schema, plus any added columns.
    """

    def __init__(self, path: str | os.PathLike, fmt: str, parquet_schema=None):
        self.path = Path(path)
        self.fmt = fmt
        self.count = 0
        if fmt == "parquet":
            self._rows: list[dict[str, Any]] = []
            self._schema = parquet_schema
            self._writer = None
        else:
            self._stream = open_binary(self.path, "wb", fmt)

    def write(self, record: Record, extra: dict[str, Any] | None = None) -> None:
        self.count += 1
        if self.fmt == "parquet":
            doc = dict(record.doc)
            if extra:
                doc.update(extra)
            self._rows.append(doc)
            if len(self._rows) >= 4096:
                self._flush_parquet()
            return
        if extra is None and record.raw is not None:
            self._stream.write(record.raw if record.raw.endswith(b"\n") else record.raw + b"\n")
            return
        doc = dict(record.doc)
        if extra:
            doc.update(extra)
        self._stream.write(dumps_line(doc))

    def write_raw(self, data: bytes, count: int) -> None:
        """Append ``count`` complete JSONL lines (each ending in ``\n``) as they are."""
        self.count += count
        self._stream.write(data)

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows and self._writer is not None:
            return
        table = pa.Table.from_pylist(self._rows, schema=self._schema) if self._schema is not None else pa.Table.from_pylist(self._rows)
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)
        self._rows = []

    def close(self) -> None:
        if self.fmt == "parquet":
            self._flush_parquet()
            if self._writer is not None:
                self._writer.close()
        else:
            self._stream.close()


def parquet_schema(path: str | os.PathLike):
    """The Arrow schema of a Parquet shard."""
    import pyarrow.parquet as pq

    return pq.read_schema(path)
