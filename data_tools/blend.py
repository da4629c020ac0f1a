"""Build Megatron-Core GPT datasets from a blend JSON written by ``sfm data mix``.

This is the one place that turns our blend files into Megatron-Core datasets; the
trainer calls :func:`build_gpt_datasets` (it imports torch through Megatron-Core, unlike
the rest of data_tools). The blend JSON is Megatron-LM's per-split data-args format,
so ``pretrain_gpt.py --per-split-data-args-path BLEND.json`` reads the same file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError

SPLITS = ("train", "valid", "test")


@dataclass
class TokenIds:
    """The tokenizer facts GPTDatasetConfig needs (``eod``, ``pad``, ``vocab_size``)."""

    eod: int
    pad: int = -1  # -1: no pad token (Megatron-Core's own default)
    vocab_size: int | None = None

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Part of Megatron-Core's dataset cache key."""
        return {"class": "TokenIds", "eod": self.eod, "pad": self.pad, "vocab_size": self.vocab_size}


def read_blend(blend: str | os.PathLike | dict[str, Any]) -> dict[str, list | None]:
    """Load a per-split blend (path or dict) and check it: ``{"train": [w, prefix, ...], ...}``."""
    where = str(blend) if not isinstance(blend, dict) else "blend"
    if not isinstance(blend, dict):
        try:
            blend = json.loads(Path(blend).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SfmError(f"{where}: blend file not found") from None
        except ValueError as exc:
            raise SfmError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(blend, dict) or "train" not in blend:
        raise SfmError(f"{where}: expected an object with a 'train' list")
    out = {}
    for split in SPLITS:
        entry = blend.get(split)
        if entry is None:
            out[split] = None
            continue
        if not isinstance(entry, list) or not entry or len(entry) % 2:
            raise SfmError(f"{where}: key {split!r} must be a list [weight, prefix, weight, prefix, ...]")
        for i in range(0, len(entry), 2):
            w, prefix = entry[i], entry[i + 1]
            try:
                if float(w) < 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise SfmError(f"{where}: {split}[{i}] is not a non-negative weight: {w!r}") from None
            if not os.path.exists(str(prefix) + ".idx"):
                raise SfmError(f"{where}: {split}[{i + 1}]: {prefix}.idx not found")
        out[split] = entry
    return out


def gpt_dataset_config(
    blend: str | os.PathLike | dict[str, Any],
    *,
    seq_length: int,
    seed: int,
    tokenizer: Any,
    path_to_cache: str | os.PathLike | None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    **extra: Any,
):
    """A ``GPTDatasetConfig`` for the blend: ``blend_per_split`` from the JSON, our defaults.

    ``tokenizer``: anything with ``eod``, ``pad`` and ``vocab_size`` (a
    :class:`megatron_sfm.data_tools.tokenizer.Tokenizer`, a :class:`TokenIds`, or a
    Megatron tokenizer). ``path_to_cache``: where Megatron-Core writes its index
    ``.npy`` files (None writes them next to each dataset, under ``cache/``).
    """
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    per_split = read_blend(blend)
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[get_blend_from_list(per_split[s]) for s in SPLITS],
        path_to_cache=None if path_to_cache is None else str(path_to_cache),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **extra,
    )


def build_gpt_datasets(
    blend: str | os.PathLike | dict[str, Any],
    *,
    seq_length: int,
    num_samples: int,
    seed: int,
    tokenizer: Any,
    path_to_cache: str | os.PathLike | None,
    valid_samples: int = 0,
    test_samples: int = 0,
    **config_kwargs: Any,
):
    """Build ``(train, valid, test)`` datasets (BlendedDataset, or GPTDataset for one prefix).

    ``num_samples``/``valid_samples``/``test_samples`` are sequences of ``seq_length``
    tokens (train: ``iterations * global_batch_size``); a split with 0 samples is None.
    Each sample is a dict of torch tensors (``tokens``, ``labels``, ``loss_mask``,
    ``position_ids``). Call on every rank after torch.distributed is initialised; rank 0
    builds the index caches first. Outside a distributed run pass ``path_to_cache=None``
    (GPTDataset then caches under ``<dataset folder>/cache/GPTDataset_indices``).
    """
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    if path_to_cache is not None and not dist.is_initialized():
        # Megatron-Core 0.16.1's BlendedDataset calls torch.distributed.get_rank() when it caches.
        raise SfmError("build_gpt_datasets: path_to_cache needs torch.distributed initialised; pass None outside a distributed run")
    per_split = read_blend(blend)
    sizes = [num_samples, valid_samples, test_samples]
    for i, split in enumerate(SPLITS):
        if not sizes[i]:
            per_split[split] = None
    config = gpt_dataset_config(
        per_split, seq_length=seq_length, seed=seed, tokenizer=tokenizer, path_to_cache=path_to_cache, **config_kwargs
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [s if s else None for s in sizes], lambda: True, config)
    return tuple(builder.build())
