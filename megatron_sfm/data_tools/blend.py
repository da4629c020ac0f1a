"""Blend files from ``sfm data mix``: the one reader of them, and Megatron-Core datasets from them.

A *blend* is JSON in Megatron-LM's per-split data-args format, ``{"train": [w1, prefix1,
w2, prefix2, ...], "valid": [...], "test": [...]}`` (prefixes of Megatron ``.bin``/``.idx``
pairs; relative prefixes are resolved against the blend file's folder), so
``pretrain_gpt.py --per-split-data-args-path BLEND.json`` reads the same file. An optional
``"sources"`` list (or ``{split: list}``) names the prefixes of each split (default: the
prefix's file name); per-source losses are keyed by these names.

This is also the one place that builds Megatron-Core's ``GPTDatasetConfig``; the trainer
(``megatron_sfm.training.data``) builds its datasets through :func:`build_gpt_datasets`.
Megatron-Core, and with it torch, is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError

SPLITS = ("train", "valid", "test")


@dataclass
class SplitBlend:
    """One split of a blend: absolute prefixes, their weights and source names (same order)."""

    prefixes: list[str]
    weights: list[float]
    names: list[str]

    def nonzero(self) -> SplitBlend | None:
        """The sources with weight > 0 (Megatron cannot build a 0-sample dataset); None if none."""
        keep = [i for i, w in enumerate(self.weights) if w > 0]
        if not keep:
            return None
        return SplitBlend(prefixes=[self.prefixes[i] for i in keep], weights=[self.weights[i] for i in keep],
                          names=[self.names[i] for i in keep])


@dataclass
class Blend:
    path: str
    splits: dict[str, SplitBlend | None]  # None: the split is absent or empty


class SimpleTokenizer:
    """The few tokenizer fields Megatron's GPTDataset reads (ids only, no text)."""

    def __init__(self, vocab_size: int | None, eod: int, pad: int | None):
        self.vocab_size = vocab_size
        self.eod = eod
        self._pad = pad
        # part of Megatron-Core's index cache key: changing it rebuilds every run's caches
        self.unique_identifiers = {"class": "SimpleTokenizer", "vocab_size": vocab_size, "eod": eod, "pad": pad}

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError("no pad token")  # GPTDataset then uses its own sentinel (-1)
        return self._pad


def read_json(path: Path, key: str) -> Any:
    """The JSON value in ``path``; a missing file or bad JSON is one line naming ``key`` and the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SfmError(f"{key}: {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise SfmError(f"{key}: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def read_blend(path: str | os.PathLike) -> Blend:
    """Parse and check a blend JSON file (every prefix's ``.bin`` and ``.idx`` exist).

    Errors are one line naming the file and key (``data.blend: FILE: 'train'[2] ...``).
    """
    path = Path(path)
    data = read_json(path, "data.blend")
    if not isinstance(data, dict) or "train" not in data:
        raise SfmError(f"data.blend: {path}: expected an object with a 'train' list")
    splits: dict[str, SplitBlend | None] = {}
    for split in SPLITS:
        raw = data.get(split)
        if raw in (None, []):
            splits[split] = None
            continue
        if not isinstance(raw, list) or len(raw) % 2:
            raise SfmError(f"data.blend: {path}: '{split}' must be a list [weight, prefix, weight, prefix, ...]")
        weights, prefixes = [], []
        for i in range(0, len(raw), 2):
            w, prefix = raw[i], raw[i + 1]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise SfmError(f"data.blend: {path}: '{split}'[{i}] must be a non-negative weight, got {w!r}")
            if not isinstance(prefix, str):
                raise SfmError(f"data.blend: {path}: '{split}'[{i + 1}] must be a path prefix, got {prefix!r}")
            full = prefix if os.path.isabs(prefix) else str((path.parent / prefix).resolve())
            for ext in (".bin", ".idx"):
                if not os.path.exists(full + ext):
                    raise SfmError(f"data.blend: {path}: '{split}' prefix {prefix!r}: {full + ext} not found")
            weights.append(float(w))
            prefixes.append(full)
        names_raw = data.get("sources")
        if isinstance(names_raw, dict):
            names_raw = names_raw.get(split)
        if isinstance(names_raw, list) and len(names_raw) == len(prefixes) and all(isinstance(n, str) for n in names_raw):
            names = list(names_raw)
        else:
            names = [Path(p).name for p in prefixes]
        splits[split] = SplitBlend(prefixes=prefixes, weights=weights, names=names)
    if splits["train"] is None:
        raise SfmError(f"data.blend: {path}: the 'train' split is empty")
    return Blend(path=str(path), splits=splits)


def gpt_dataset_config(blend: Blend | None, sizes: Sequence[int], *, seq_length: int, seed: int, tokenizer: Any,
                       path_to_cache: str | None):
    """Megatron-Core's ``GPTDatasetConfig`` for ``blend`` (None: mock data), with our defaults.

    ``sizes``: samples of (train, valid, test); a split with 0 samples, or with no source of
    weight > 0, gets no blend (Megatron then builds None for it). ``tokenizer``: anything
    with ``eod``, ``pad``, ``vocab_size`` and ``unique_identifiers`` (a
    :class:`SimpleTokenizer`, our ``data_tools.tokenizer.Tokenizer``).
    """
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    def megatron_blend(split, size):
        sb = blend.splits.get(split) if size else None
        sb = sb.nonzero() if sb is not None else None
        return None if sb is None else (sb.prefixes, sb.weights if len(sb.prefixes) > 1 else None)

    kwargs = {} if blend is None else {"blend_per_split": [megatron_blend(s, n) for s, n in zip(SPLITS, sizes)]}
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        # Pythia/GPT-NeoX pack documents with EOD and no resets; causal kernels make their own mask
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=path_to_cache,
        mid_level_dataset_surplus=0.005,
        **kwargs,
    )


def build_gpt_datasets(blend: Blend | None, sizes: Sequence[int], **config_kwargs: Any) -> tuple:
    """Build ``(train, valid, test)``: BlendedDataset, GPTDataset for one prefix, or None.

    ``blend`` None builds Megatron's ``MockGPTDataset``s. ``sizes``, ``config_kwargs``: as
    :func:`gpt_dataset_config`; sizes count sequences of ``seq_length`` tokens. Each sample
    is a dict of torch tensors (``tokens``, ``labels``, ``loss_mask``, ``position_ids``, and
    ``dataset_id`` when blended). Call on every rank; rank 0 builds the index caches first.
    A ``path_to_cache`` needs torch.distributed initialised (Megatron-Core 0.16.1's
    BlendedDataset asks for the rank); outside a distributed run pass None.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    config = gpt_dataset_config(blend, sizes, **config_kwargs)
    cls = MockGPTDataset if blend is None else GPTDataset
    try:
        return tuple(BlendedMegatronDatasetBuilder(cls, list(sizes), lambda: True, config).build())
    except SfmError:
        raise
    except Exception as exc:  # Megatron raises bare asserts/ValueErrors on bad data
        raise SfmError(f"data: building the datasets failed: {type(exc).__name__}: {exc}") from exc
