"""Read the tensors of a Hugging Face model folder one at a time (or one slice at a time).

Supports ``model.safetensors``, ``model.safetensors.index.json`` (shards), and, for old
checkpoints, ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``. Pickled weights
are only ever read with ``torch.load(weights_only=True)``; a file that needs more than
tensors is refused with an :class:`SfmError`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from megatron_sfm.errors import SfmError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` with errors turned into one-line SfmErrors."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SfmError(f"{path}: refusing to load: the file is not a plain tensor pickle "
                       f"(weights_only=True rejected it: {first})") from None
    except FileNotFoundError:
        raise SfmError(f"{path}: not found") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SfmError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SfmError(f"{path}: expected a dict of tensors")
    return obj


# Some re-saved GPTNeoX checkpoints name the output layer by its transformers attribute.
from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

KEY_ALIASES = GPTNeoXAdapter.HF_KEY_ALIASES


class HFWeights:
    """Lazy access to the tensors of a Hugging Face folder, by file key.

    Keys are the GPT-NeoX file keys; ``lm_head.weight`` is read as ``embed_out.weight``.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._renamed: dict[str, str] = {}  # our key -> the key in the file
        self._index_keys()
        self._add_aliases()

    def _index_keys(self) -> None:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.dir / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise SfmError(f"{index}: not a valid weight index ({type(exc).__name__})") from None
                for key, name in weight_map.items():
                    path = self.dir / name
                    if not path.exists():
                        raise SfmError(f"{index}: shard {name} (holding {key!r}) is missing")
                    self._files[key] = path
                return
        single = self.dir / "model.safetensors"
        if single.exists():
            for key in self._safe(single).keys():  # noqa: SIM118 - a safetensors handle, not a dict
                self._files[key] = single
            return
        legacy = self.dir / "pytorch_model.bin"
        if legacy.exists():
            for key in self._pickle(legacy):
                self._files[key] = legacy
            return
        raise SfmError(f"{self.dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def _safe(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise SfmError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None
        return self._handles[path]

    def _pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickled:
            self._pickled = {path: load_pickled_weights(path)}  # keep one pickled shard at a time
        return self._pickled[path]

    def keys(self) -> list[str]:
        return list(self._files)

    def _add_aliases(self) -> None:
        for alias, key in KEY_ALIASES.items():
            if alias in self._files:
                if key in self._files:
                    raise SfmError(f"{self.dir}: has both {alias!r} and {key!r}")
                self._files[key] = self._files.pop(alias)
                self._renamed[key] = alias

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def _file(self, key: str) -> Path:
        try:
            return self._files[key]
        except KeyError:
            raise SfmError(f"{self.dir}: tensor {key!r} is missing from the checkpoint") from None

    def shape(self, key: str) -> tuple[int, ...]:
        path = self._file(key)
        key = self._renamed.get(key, key)
        if path.suffix == ".safetensors":
            return tuple(self._safe(path).get_slice(key).get_shape())
        return tuple(self._pickle(path)[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        path = self._file(key)
        key = self._renamed.get(key, key)
        if path.suffix == ".safetensors":
            name = self._safe(path).get_slice(key).get_dtype()
            return SAFETENSORS_DTYPES[name]
        return self._pickle(path)[key].dtype

    def get(self, key: str, index: Sequence[slice] | None = None) -> torch.Tensor:
        """The tensor ``key``, or only ``tensor[index]`` (reads just that part of a safetensors file)."""
        path = self._file(key)
        key = self._renamed.get(key, key)
        if path.suffix == ".safetensors":
            handle = self._safe(path)
            if index is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[tuple(index)]
        tensor = self._pickle(path)[key]
        return tensor if index is None else tensor[tuple(index)].clone()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._files:
            yield key, self.get(key)
