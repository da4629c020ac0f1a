"""Read tensors (or slices of them) from a torch_dist checkpoint, one at a time, safely.

A ``torch_dist`` checkpoint (Megatron-Core ``dist_checkpointing``) is a
``torch.distributed.checkpoint`` folder: ``.metadata`` (a pickle of
``torch.distributed.checkpoint.metadata.Metadata``: for each key its global shape, dtype
and chunks; for each chunk the file, byte offset and length) and ``__R_T.distcp`` files
holding each chunk as an individual ``torch.save`` record.

This reader needs no process group and loads only the chunks that overlap the requested
region, so exporting a model costs about one layer's tensor in memory, whatever the
TP/PP layout that wrote it. Safety:

* ``.metadata`` is unpickled with an allowlist (the DCP metadata classes, ``torch.Size``,
  dtypes); anything else, e.g. a ``posix.system`` reference, is an :class:`SfmError`;
* chunks are read with ``torch.load(weights_only=True)`` only (never with the full unpickler).
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sfm.errors import SfmError

_ALLOWED_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed._shard.sharded_tensor.metadata": {"TensorProperties", "MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if module == "torch":
            value = getattr(torch, name, None)
            if name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        elif name in _ALLOWED_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise SfmError(f"{self._path}: refusing to unpickle {module}.{name} (not part of checkpoint "
                       "metadata; the file may be malicious or from an unsupported writer)")


def read_metadata(iter_dir: Path):
    """The DCP ``Metadata`` of ``iter_dir`` (restricted unpickling)."""
    path = Path(iter_dir) / ".metadata"
    if not path.exists():
        raise SfmError(f"{path}: missing (not a complete torch_dist checkpoint)")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except SfmError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/garbled pickles raise many types
        raise SfmError(f"{path}: cannot read checkpoint metadata ({type(exc).__name__}: {exc})") from None
    if not hasattr(metadata, "state_dict_metadata") or not hasattr(metadata, "storage_data"):
        raise SfmError(f"{path}: not torch.distributed.checkpoint metadata")
    return metadata


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int
    byte_length: int


class DCPReader:
    """Tensors of one torch_dist iteration folder, by checkpoint key."""

    def __init__(self, iter_dir: str | Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(iter_dir)
        metadata = read_metadata(self.dir)
        storage = {}
        for index, info in (metadata.storage_data or {}).items():
            offset = tuple(index.offset) if index.offset is not None else None
            storage[(index.fqn, offset)] = info
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        for key, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                continue
            self._shapes[key] = tuple(md.size)
            self._dtypes[key] = md.properties.dtype
            chunks = []
            for chunk in md.chunks:
                offsets = tuple(chunk.offsets)
                info = storage.get((key, offsets))
                if info is None:
                    raise SfmError(f"{self.dir / '.metadata'}: no storage entry for {key} chunk at {list(offsets)}")
                if getattr(info, "transform_descriptors", None):
                    raise SfmError(f"{self.dir}: {key} is stored with transforms {info.transform_descriptors} "
                                   "(compressed checkpoints are not supported)")
                chunks.append(_Chunk(offsets, tuple(chunk.sizes), info.relative_path, info.offset, info.length))
            self._chunks[key] = chunks
        self._file_sizes: dict[str, int] = {}
        self._handles: dict[str, io.BufferedReader] = {}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        self._check_key(key)
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        self._check_key(key)
        return self._dtypes[key]

    def chunks(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of every stored chunk of ``key`` (the layout that wrote it)."""
        self._check_key(key)
        return [(c.offsets, c.sizes) for c in self._chunks[key]]

    def _check_key(self, key: str) -> None:
        if key not in self._shapes:
            raise SfmError(f"{self.dir}: tensor {key!r} is not in the checkpoint")

    def check_files(self, keys: Sequence[str] | None = None) -> None:
        """Every chunk file of ``keys`` (default: all) exists and is long enough.

        A missing or truncated shard is an :class:`SfmError` naming the file.
        """
        for key in self._chunks if keys is None else keys:
            self._check_key(key)
            for chunk in self._chunks[key]:
                self._check_chunk_file(key, chunk)

    def _check_chunk_file(self, key: str, chunk: _Chunk) -> None:
        size = self._file_sizes.get(chunk.file)
        if size is None:
            path = self.dir / chunk.file
            if not path.exists():
                raise SfmError(f"{path}: missing shard file (holds {key} at {list(chunk.offsets)}); "
                               "the checkpoint is incomplete")
            size = self._file_sizes[chunk.file] = path.stat().st_size
        if chunk.byte_offset + chunk.byte_length > size:
            raise SfmError(f"{self.dir / chunk.file}: {size} bytes, but {key} needs bytes up to "
                           f"{chunk.byte_offset + chunk.byte_length} (truncated shard)")

    def _load_chunk(self, key: str, chunk: _Chunk) -> torch.Tensor:
        self._check_chunk_file(key, chunk)
        handle = self._handles.get(chunk.file)
        if handle is None:
            handle = self._handles[chunk.file] = open(self.dir / chunk.file, "rb")  # noqa: SIM115 - kept open, closed by close()
        handle.seek(chunk.byte_offset)
        data = handle.read(chunk.byte_length)
        try:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SfmError(f"{self.dir / chunk.file}: refusing to load {key} at {list(chunk.offsets)}: not a "
                           f"plain tensor record (weights_only=True rejected it: {first})") from None
        except Exception as exc:  # noqa: BLE001 - corrupted records raise many types
            raise SfmError(f"{self.dir / chunk.file}: cannot read {key} at {list(chunk.offsets)} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != chunk.sizes:
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise SfmError(f"{self.dir / chunk.file}: {key} at {list(chunk.offsets)}: stored {got}, metadata says "
                           f"{list(chunk.sizes)}")
        return tensor

    def read(self, key: str, index: Sequence[slice] | None = None) -> torch.Tensor:
        """``tensor[index]`` of the global tensor ``key`` (whole tensor without ``index``).

        ``index`` holds one ``slice(start, stop)`` (step 1) per leading axis; missing
        trailing axes are taken whole. Only the overlapping chunks are read.
        """
        self._check_key(key)
        shape = self._shapes[key]
        index = list(index or [])
        if len(index) > len(shape):
            raise SfmError(f"{key}: {len(index)} indices for a {len(shape)}-d tensor")
        bounds = []
        for axis, size in enumerate(shape):
            sl = index[axis] if axis < len(index) else slice(None)
            start, stop, step = sl.indices(size)
            if step != 1 or stop <= start:
                raise SfmError(f"{key}: bad slice {sl} for axis {axis} of size {size}")
            bounds.append((start, stop))
        out = torch.empty([b - a for a, b in bounds], dtype=self._dtypes[key])
        covered = 0
        for chunk in self._chunks[key]:
            inter = [(max(a, o), min(b, o + n)) for (a, b), o, n in zip(bounds, chunk.offsets, chunk.sizes)]
            if any(lo >= hi for lo, hi in inter):
                continue
            data = self._load_chunk(key, chunk)
            src = data[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, chunk.offsets))]
            dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, bounds))
            out[dst] = src
            covered += math.prod(hi - lo for lo, hi in inter)
            del data, src
        if covered != out.numel():
            raise SfmError(f"{self.dir}: {key}{[list(b) for b in bounds]} is only partly stored "
                           f"({covered} of {out.numel()} elements); the checkpoint is incomplete")
        return out
