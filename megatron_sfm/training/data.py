"""Training data: blends from ``sfm data mix`` through Megatron-Core's dataset builder.

A *blend* file is JSON ``{"train": [w1, prefix1, w2, prefix2, ...], "valid": [...],
"test": [...]}`` (prefixes of Megatron ``.bin``/``.idx`` pairs; relative prefixes are
resolved against the blend file's folder). An optional ``"sources"`` list names the
prefixes of each split (default: the prefix's file name); per-source losses are keyed
by these names.

A *phases* file (late insertion) is JSON ``{"phases": [{"start_iteration": 0, "blend":
"a.json"}, {"start_iteration": 900, "blend": "b.json"}]}``: each phase trains on its own
blend from its start iteration to the next phase's start (or ``train_iters``).

Samples are addressed by a *global sample index*: iteration ``i`` consumes indices
``[i*G, (i+1)*G)`` (G = global batch size). Micro-batch ``m`` of data-parallel rank
``r`` holds ``i*G + m*M*D + r*M + [0, M)`` (M = micro-batch size, D = data-parallel
size), which is Megatron-LM's pretraining sampler order. Resume therefore needs only the
number of consumed samples, and every layout sees the same micro-batches.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_sfm.config.schema import RunConfig
from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class SplitBlend:
    prefixes: list[str]
    weights: Optional[list[float]]
    names: list[str]


@dataclass
class Blend:
    path: str
    splits: dict[str, Optional[SplitBlend]]


@dataclass
class Phase:
    start_iteration: int
    blend: Blend
    loss_weights: dict = field(default_factory=dict)  # {source name: weight} from phases.json ("loss_weights")


class SimpleTokenizer:
    """The few tokenizer fields Megatron's GPTDataset reads (ids only, no text)."""

    def __init__(self, vocab_size: int, eod: int, pad: Optional[int]):
        self.vocab_size = vocab_size
        self.eod = eod
        self._pad = pad
        self.unique_identifiers = {"class": "SimpleTokenizer", "vocab_size": vocab_size, "eod": eod, "pad": pad}

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError("no pad token")  # GPTDataset then uses its own sentinel (-1)
        return self._pad


def _source_name(prefix: str) -> str:
    return Path(prefix).name


def read_blend(path: str | os.PathLike) -> Blend:
    """Parse a blend JSON file; errors name the file and key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SfmError(f"data.blend: {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise SfmError(f"data.blend: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or "train" not in data:
        raise SfmError(f"data.blend: {path}: expected an object with a 'train' list")
    splits: dict[str, Optional[SplitBlend]] = {}
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
            names = [_source_name(p) for p in prefixes]
        splits[split] = SplitBlend(prefixes=prefixes, weights=weights, names=names)
    if splits["train"] is None:
        raise SfmError(f"data.blend: {path}: the 'train' split is empty")
    return Blend(path=str(path), splits=splits)


def read_phases(path: str | os.PathLike, train_iters: int, stage: Optional[str] = None) -> list[Phase]:
    """Phases of one stage from ``sfm data mix``'s phases.json (or the short form).

    ``sfm data mix`` writes ``{"stages": [{"stage": NAME, "phases": [{"start_iteration",
    "blend", "weights": {source: w}}, ...]}, ...]}`` with start iterations relative to the
    stage; ``stage`` picks one (needed when there are several). The short form is
    ``{"phases": [{"start_iteration": N, "blend": FILE}, ...]}``. Blend paths are relative
    to the phases file. Source names come from ``weights`` (else the prefixes' names).

    Per-source loss weights: an optional ``"loss_weights": {source: w}`` at the top level
    (the condition), on a stage object and on a phase object; the more specific level
    wins per source (phase > stage > condition); sources not named have weight 1.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SfmError(f"data.phases: {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise SfmError(f"data.phases: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    from megatron_sfm.training.loss import check_loss_weights

    where = f"data.phases: {path}"
    base_weights = check_loss_weights(data.get("loss_weights"), f"{where}: loss_weights") if isinstance(data, dict) else {}
    known: set = set()
    if isinstance(data, dict) and "stages" in data:
        stages = data["stages"] or []
        for st in stages:
            for ph in (st.get("phases") or []) if isinstance(st, dict) else []:
                if isinstance(ph, dict) and isinstance(ph.get("weights"), dict):
                    known.update(str(k) for k in ph["weights"])
        names = [s.get("stage") for s in stages if isinstance(s, dict)]
        if stage is None:
            if len(stages) != 1:
                raise SfmError(f"data.stage: {path} has stages {names}; say which one (data.stage=NAME)")
            chosen = stages[0]
        else:
            matches = [s for s in stages if isinstance(s, dict) and s.get("stage") == stage]
            if not matches:
                raise SfmError(f"data.stage: {stage!r} is not a stage of {path} (stages: {names})")
            chosen = matches[0]
        raw = chosen.get("phases")
        stage_key = f"stages[{stages.index(chosen)}]"
        base_weights = {**base_weights, **check_loss_weights(chosen.get("loss_weights"),
                                                             f"{where}: {stage_key}.loss_weights")}
    else:
        raw = data.get("phases") if isinstance(data, dict) else data
        stage_key = ""
    if not isinstance(raw, list) or not raw:
        raise SfmError(f"data.phases: {path}: expected {{\"phases\": [{{\"start_iteration\": N, \"blend\": FILE}}, ...]}}")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "blend" not in item:
            raise SfmError(f"data.phases: {path}: phases[{i}] needs 'blend' and 'start_iteration'")
        start = item.get("start_iteration", item.get("start_iter", 0 if i == 0 else None))
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise SfmError(f"data.phases: {path}: phases[{i}].start_iteration must be a non-negative integer")
        entries.append((start, item))
    starts = [start for start, _ in entries]
    if starts[0] != 0:
        raise SfmError(f"data.phases: {path}: the first phase must start at iteration 0")
    if starts != sorted(set(starts)):
        raise SfmError(f"data.phases: {path}: start iterations must increase, got {starts}")
    if starts[-1] >= train_iters:
        raise SfmError(
            f"data.phases: {path}: phase start {starts[-1]} is not before training.train_iters {train_iters}")
    phases = []
    for start, item in entries:
        blend_path = item["blend"]
        if not os.path.isabs(blend_path):
            blend_path = str(path.parent / blend_path)
        blend = read_blend(blend_path)
        weights = item.get("weights")
        if isinstance(weights, dict):
            for sb in blend.splits.values():
                if sb is not None and len(weights) == len(sb.prefixes):
                    sb.names = [str(k) for k in weights]
        for sb in blend.splits.values():
            if sb is not None:
                known.update(sb.names)
        key = f"{stage_key}.phases[{len(phases)}]" if stage_key else f"phases[{len(phases)}]"
        loss_weights = {**base_weights, **check_loss_weights(item.get("loss_weights"), f"{where}: {key}.loss_weights")}
        phases.append(Phase(start_iteration=start, blend=blend, loss_weights=loss_weights))
    for phase in phases:
        unknown = sorted(set(phase.loss_weights) - known)
        if unknown:
            raise SfmError(f"{where}: loss_weights name {', '.join(map(repr, unknown))}, which is not a source "
                           f"of this file (sources: {', '.join(sorted(known))})")
    return phases


@dataclass
class DataSources:
    """All datasets of a run and the names of the sources the loss is split by."""

    train_phases: list[tuple[int, object, list[int]]]  # (start_iteration, dataset, local->global source id)
    valid: Optional[object]
    valid_source_map: list[int]
    source_names: list[str]
    global_batch_size: int
    # per train phase: loss weight of each source (source_names order), None when all are 1
    train_loss_weights: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def phase_at(self, iteration: int) -> int:
        index = 0
        for i, (start, _, _) in enumerate(self.train_phases):
            if iteration >= start:
                index = i
        return index


def _gpt_config(cfg: RunConfig, blend: Optional[Blend], cache_dir: Optional[str], seq_length: int):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    def pair(split):
        sb = _nonzero(blend.splits.get(split)) if blend else None
        if sb is None:
            return None
        return (sb.prefixes, sb.weights if len(sb.prefixes) > 1 else None)

    kwargs = dict(
        random_seed=cfg.data.split_seed,
        sequence_length=seq_length,
        tokenizer=SimpleTokenizer(cfg.model.vocab_size, cfg.data.eod_token_id, cfg.data.pad_token_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache_dir,
        mid_level_dataset_surplus=0.005,
    )
    if blend is not None:
        kwargs["blend_per_split"] = [pair(s) for s in SPLITS]
    return GPTDatasetConfig(**kwargs)


def _nonzero(sb: Optional[SplitBlend]) -> Optional[SplitBlend]:
    """Drop zero-weight sources (Megatron cannot build a 0-sample dataset); None if none left."""
    if sb is None:
        return None
    keep = [i for i, w in enumerate(sb.weights or [1.0] * len(sb.prefixes)) if w > 0]
    if not keep:
        return None
    return SplitBlend(prefixes=[sb.prefixes[i] for i in keep],
                      weights=[sb.weights[i] for i in keep] if sb.weights else None,
                      names=[sb.names[i] for i in keep])


def _build(cls, sizes, config):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    try:
        return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    except SfmError:
        raise
    except Exception as exc:  # noqa: BLE001 - Megatron raises bare asserts/ValueErrors on bad data
        raise SfmError(f"data: building the datasets failed: {type(exc).__name__}: {exc}") from exc


def build_data(cfg: RunConfig, seq_length: Optional[int] = None) -> DataSources:
    """Build the train phases and the validation dataset (on every rank; cheap index files).

    Sizes: each phase gets exactly the samples its iterations consume; validation gets
    ``eval_iters`` global batches per evaluation.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    from megatron_sfm.training.loss import weight_vector

    t = cfg.training
    g = t.global_batch_size
    seq_length = seq_length or cfg.model.seq_length
    n_evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval > 0 else 0
    valid_size = n_evals * t.eval_iters * g
    if cfg.data.mock:
        config = _gpt_config(cfg, None, cfg.data.cache_dir, seq_length)
        train, valid, _ = _build(MockGPTDataset, [t.train_iters * g, max(valid_size, 1), 1], config)
        weights = weight_vector(["mock"], cfg.data.source_loss_weights, "data.source_loss_weights")
        return DataSources(train_phases=[(0, train, [0])], valid=valid if valid_size else None,
                           valid_source_map=[0], source_names=["mock"], global_batch_size=g,
                           train_loss_weights=[weights])
    if cfg.data.phases:
        phases = read_phases(cfg.data.phases, t.train_iters, cfg.data.stage)
    elif cfg.data.blend:
        phases = [Phase(0, read_blend(cfg.data.blend))]
    else:
        raise SfmError("data: set data.blend (a blend JSON from 'sfm data mix'), data.phases, or data.mock: true")
    names: list[str] = []

    def global_ids(local_names):
        out = []
        for n in local_names:
            if n not in names:
                names.append(n)
            out.append(names.index(n))
        return out

    train_phases = []
    valid = None
    valid_map = [0]
    for i, phase in enumerate(phases):
        end = phases[i + 1].start_iteration if i + 1 < len(phases) else t.train_iters
        n_train = (end - phase.start_iteration) * g
        cache = cfg.data.cache_dir or str(Path(phase.blend.path).parent / "cache")
        config = _gpt_config(cfg, phase.blend, cache, seq_length)
        want_valid = i == 0 and valid_size > 0 and _nonzero(phase.blend.splits.get("valid")) is not None
        sizes = [n_train, valid_size if want_valid else 0, 0]
        if not want_valid:
            config.blend_per_split[1] = None
        config.blend_per_split[2] = None
        train_ds, valid_ds, _ = _build(GPTDataset, sizes, config)
        train_split = _nonzero(phase.blend.splits["train"])
        if train_split is None:
            raise SfmError(f"data: {phase.blend.path}: every 'train' weight is zero")
        train_phases.append((phase.start_iteration, train_ds, global_ids(train_split.names)))
        if want_valid:
            valid = valid_ds
            valid_map = global_ids(_nonzero(phase.blend.splits["valid"]).names)
    # the config's weights override the phases file's, per source; both name sources of this run
    weight_vector(names, cfg.data.source_loss_weights, "data.source_loss_weights")
    loss_weights = []
    for phase in phases:
        merged = {k: v for k, v in phase.loss_weights.items() if k in names}  # other stages' sources: unused
        merged.update(cfg.data.source_loss_weights)
        loss_weights.append(weight_vector(names, merged, "data.source_loss_weights"))
    return DataSources(train_phases=train_phases, valid=valid, valid_source_map=valid_map, source_names=names,
                       global_batch_size=g, train_loss_weights=loss_weights)


def collate(samples: list[dict], source_map: list[int], indices: list[int]) -> dict:
    """Stack GPTDataset samples into one micro-batch (CPU tensors)."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}
    batch["source_ids"] = torch.tensor([source_map[int(s.get("dataset_id", 0))] for s in samples], dtype=torch.long)
    batch["sample_index"] = torch.tensor(indices, dtype=torch.long)
    return batch


class MicroBatchIterator:
    """Yields this data-parallel rank's micro-batches in global-sample-index order.

    ``consumed`` is the global index of the first sample of the current global batch; it
    advances by G after each ``num_microbatches`` micro-batches. ``record`` (optional
    callable) receives (iteration, [global indices], tokens) per micro-batch (test hook).
    """

    def __init__(self, sources: DataSources, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 *, split: str = "train", record=None):
        self.sources = sources
        self.g = sources.global_batch_size
        self.m = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = self.g // (self.m * dp_size)
        self.consumed = consumed
        self._mb = 0
        self.split = split
        self.record = record

    def __iter__(self):
        return self

    def _lookup(self, index: int):
        if self.split == "valid":
            ds = self.sources.valid
            return ds, index % len(ds), self.sources.valid_source_map, None
        iteration = index // self.g
        p = self.sources.phase_at(iteration)
        start, ds, smap = self.sources.train_phases[p]
        local = index - start * self.g
        if local >= len(ds):
            raise SfmError(f"data: the training dataset of phase {p} has {len(ds)} samples; sample {local} was asked "
                           f"(training.train_iters larger than the blend was built for?)")
        return ds, local, smap, p

    def __next__(self) -> dict:
        base = self.consumed + self._mb * self.m * self.dp_size + self.dp_rank * self.m
        indices = list(range(base, base + self.m))
        samples, smap, phase = [], None, None
        for index in indices:
            ds, local, smap, phase = self._lookup(index)  # one micro-batch: one iteration, one phase
            samples.append(ds[local])
        batch = collate(samples, smap, indices)
        weights = self.sources.train_loss_weights[phase] if phase is not None and self.sources.train_loss_weights \
            else None
        if weights is not None:
            batch["source_weights"] = torch.tensor(weights, dtype=torch.float32)
        if self.record is not None:
            self.record(self.consumed // self.g, indices, batch["tokens"])
        self._mb += 1
        if self._mb == self.num_microbatches:
            self._mb = 0
            self.consumed += self.g
        return batch


def sample_hash(tokens: torch.Tensor) -> list[int]:
    """A short content hash per sample (test hook: no repeat, no gap)."""
    import zlib

    arr = tokens.numpy().astype(np.int64)
    return [zlib.crc32(row.tobytes()) for row in arr]
