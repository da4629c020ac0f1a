"""Write safetensors files tensor by tensor (no whole-shard buffer in memory).

A safetensors file is an 8-byte little-endian header length, a JSON header giving every
tensor's dtype, shape and byte range, then the raw bytes. All shapes and dtypes are known
before any tensor is read (from the checkpoint metadata), so the header is written first
and each tensor is appended as soon as it is produced, then dropped. Peak memory is one
tensor, not one shard.

Sharding follows Hugging Face: ``model.safetensors`` when everything fits in
``max_shard_bytes``, else ``model-0000K-of-0000N.safetensors`` plus
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sfm.errors import SfmError

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's "5GB"
SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": SAFETENSORS_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return raw


def write_safetensors_stream(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                             metadata: dict[str, str] | None = None, on_tensor: Callable[[TensorSpec], None] | None = None
                             ) -> None:
    """Write one safetensors file whose tensors are produced one at a time by ``produce``."""
    header = _header(specs, {"format": "pt", **(metadata or {})})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in specs:
            tensor = produce(spec)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise SfmError(f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{spec.shape} {spec.dtype}")
            tensor = tensor.detach().to("cpu").contiguous()
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            if on_tensor is not None:
                on_tensor(spec)
            del tensor


def write_sharded(out_dir: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  on_tensor: Callable[[TensorSpec], None] | None = None) -> list[str]:
    """Write ``specs`` into ``out_dir`` as Hugging Face (sharded) safetensors; return the file names."""
    names = {s.name for s in specs}
    if len(names) != len(specs):
        raise SfmError("duplicate tensor names in the export plan")
    shards = plan_shards(specs, max_shard_bytes)
    files = shard_file_names(len(shards))
    for name, shard in zip(files, shards):
        write_safetensors_stream(out_dir / name, shard, produce, on_tensor=on_tensor)
    if len(files) > 1:
        weight_map = {spec.name: name for name, shard in zip(files, shards) for spec in shard}
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files
