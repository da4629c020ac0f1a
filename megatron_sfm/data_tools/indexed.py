"""A numpy-only reader and writer for Megatron-Core's indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

The reader lets ``sfm data inspect`` and ``sfm data mix`` count documents and tokens
without importing torch; the writer (:class:`IndexWriter`, byte-identical to Megatron-Core's
``IndexedDatasetBuilder``, tested) lets ``sfm data tokenize`` skip the Megatron-Core/torch
import. Layout of the ``.idx`` file (little
endian): ``MMIDIDX\\0\\0``, u64 version (1), u8 dtype code, u64 sequence count, u64
document count, int32 sequence lengths, int64 byte pointers, int64 document indices
(sequence index where each document ends, starting with 0). The ``.bin`` file is the
token ids back to back in the dtype.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_sfm.errors import SfmError

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def optimal_dtype(vocab_size: int | None) -> type:
    """The token dtype Megatron-LM picks for a vocabulary size (``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


@dataclass
class IndexedData:
    """An opened dataset: lengths and pointers per sequence, document boundaries, token memmap."""

    prefix: str
    dtype: type
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray
    tokens: np.ndarray  # memmap over the .bin file

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // np.dtype(self.dtype).itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    def document(self, i: int) -> np.ndarray:
        """All tokens of document ``i`` (its sequences concatenated)."""
        a, b = int(self.document_indices[i]), int(self.document_indices[i + 1])
        if a == b:
            return np.zeros(0, self.dtype)
        start = int(self.sequence_pointers[a]) // np.dtype(self.dtype).itemsize
        n = int(self.sequence_lengths[a:b].sum(dtype=np.int64))
        return self.tokens[start : start + n]


def stats_path(prefix: str | os.PathLike) -> str:
    """``PREFIX.stats.json``: what ``sfm data tokenize`` records beside ``PREFIX.bin/.idx``."""
    return str(prefix) + ".stats.json"


def read_index(prefix: str | os.PathLike, *, with_tokens: bool = True) -> IndexedData:
    """Open ``prefix.idx`` (and memmap ``prefix.bin``); SfmError naming the file on any problem."""
    prefix = str(prefix)
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    if not idx_path.exists():
        raise SfmError(f"{idx_path}: index file not found (is {prefix!r} the prefix written by 'sfm data tokenize'?)")
    if with_tokens and not bin_path.exists():
        raise SfmError(f"{bin_path}: data file not found")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    if raw.shape[0] < 34 or bytes(raw[:9]) != INDEX_HEADER:
        raise SfmError(f"{idx_path}: not a Megatron indexed-dataset index (bad header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", bytes(raw[9:34]))
    if version != 1 or code not in DTYPE_CODES:
        raise SfmError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
    offset = 34
    need = offset + n_seq * 4 + n_seq * 8 + n_doc * 8
    if raw.shape[0] < need:
        raise SfmError(f"{idx_path}: truncated index ({raw.shape[0]} bytes, expected at least {need})")
    lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=offset)
    offset += n_seq * 4
    pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=offset)
    offset += n_seq * 8
    doc_idx = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=offset)
    dtype = DTYPE_CODES[code]
    if with_tokens:
        size = bin_path.stat().st_size
        expected = int(lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize
        if size != expected:
            raise SfmError(f"{bin_path}: {size} bytes but the index describes {expected}")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    else:
        tokens = np.zeros(0, dtype)
    return IndexedData(prefix, dtype, lengths, pointers, doc_idx, tokens)


class IndexWriter:
    """Writes ``PREFIX.bin`` / ``PREFIX.idx`` exactly as Megatron-Core's ``IndexedDatasetBuilder``
    does for document-level datasets (one ``add_document`` per document, then ``finalize``),
    with numpy alone, so that ``sfm data tokenize`` need not import Megatron-Core and torch
    (about 5 CPU-seconds). Byte identity with the builder is tested.

    ``add_documents(tokens, lengths)``: ``tokens`` is the documents' ids back to back,
    ``lengths`` the token count of each document (0 for a document with no tokens, which
    gets no sequence, as ``add_document(ids, [])`` does).
    """

    def __init__(self, bin_path: str | os.PathLike, dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.type not in DTYPE_CODES.values():
            raise SfmError(f"unsupported token dtype {self.dtype}")
        self.data_file = open(bin_path, "wb")  # noqa: SIM115 - closed by finalize (as the builder does)
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.add_lengths(lengths)

    def add_lengths(self, lengths: np.ndarray) -> None:
        """Index entries for documents whose tokens were already appended to ``data_file``."""
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def finalize(self, idx_path: str | os.PathLike) -> None:
        self.data_file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        write_index(idx_path, self.dtype, lengths)


def write_index(idx_path: str | os.PathLike, dtype, document_lengths: np.ndarray) -> None:
    """Write a document-level ``.idx`` (one sequence per non-empty document) as Megatron-Core's
    ``_IndexWriter`` does: header, version 1, dtype code, counts, int32 sequence lengths,
    int64 byte pointers, int64 document indices."""
    dtype = np.dtype(dtype)
    code = {np.dtype(v): k for k, v in DTYPE_CODES.items()}[dtype]
    document_lengths = np.asarray(document_lengths, dtype=np.int64)
    nonempty = document_lengths > 0
    seq_lengths = document_lengths[nonempty]
    if seq_lengths.size and int(seq_lengths.max()) > np.iinfo(np.int32).max:
        raise SfmError(f"{idx_path}: a document has more than 2**31-1 tokens")
    pointers = np.zeros(seq_lengths.size, np.int64)
    if seq_lengths.size > 1:
        np.cumsum(seq_lengths[:-1] * dtype.itemsize, out=pointers[1:])
    doc_indices = np.zeros(document_lengths.size + 1, np.int64)
    np.cumsum(nonempty, out=doc_indices[1:])
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", seq_lengths.size))
        f.write(struct.pack("<Q", doc_indices.size))
        f.write(seq_lengths.astype(np.int32).tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_indices.tobytes(order="C"))
