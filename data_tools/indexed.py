"""A numpy-only reader for Megatron-Core's indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

The writer is Megatron-Core's own ``IndexedDatasetBuilder`` (see tokenize_corpus.py);
this reader exists so that ``sfm data inspect`` and ``sfm data mix`` can count
documents and tokens without importing torch. Layout of the ``.idx`` file (little
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
