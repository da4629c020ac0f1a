"""Training data: blends from ``sfm data mix`` through Megatron-Core's dataset builder.

A *blend* file (``{"train": [w1, prefix1, ...], "valid": [...], "test": [...]}``, with
optional ``"sources"`` names) is read, and built into datasets, by
``megatron_sfm.data_tools.blend``; per-source losses are keyed by its source names.

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

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_sfm.config.schema import RunConfig
from megatron_sfm.data_tools.blend import Blend, SimpleTokenizer, build_gpt_datasets, read_blend, read_json
from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)


@dataclass
class Phase:
    start_iteration: int
    blend: Blend
    loss_weights: dict = field(default_factory=dict)  # {source name: weight} from phases.json ("loss_weights")


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
    data = read_json(path, "data.phases")
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


def build_data(cfg: RunConfig, seq_length: Optional[int] = None) -> DataSources:
    """Build the train phases and the validation dataset (on every rank; cheap index files).

    Sizes: each phase gets exactly the samples its iterations consume; validation gets
    ``eval_iters`` global batches per evaluation.
    """
    from megatron_sfm.training.loss import weight_vector

    t = cfg.training
    g = t.global_batch_size
    n_evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval > 0 else 0
    valid_size = n_evals * t.eval_iters * g
    dataset_args = dict(seq_length=seq_length or cfg.model.seq_length, seed=cfg.data.split_seed,
                        tokenizer=SimpleTokenizer(cfg.model.vocab_size, cfg.data.eod_token_id, cfg.data.pad_token_id))
    if cfg.data.mock:
        train, valid, _ = build_gpt_datasets(None, [t.train_iters * g, max(valid_size, 1), 1],
                                             path_to_cache=cfg.data.cache_dir, **dataset_args)
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
        train_split = phase.blend.splits["train"].nonzero()
        if train_split is None:
            raise SfmError(f"data: {phase.blend.path}: every 'train' weight is zero")
        valid_split = phase.blend.splits["valid"].nonzero() if phase.blend.splits["valid"] else None
        want_valid = i == 0 and valid_size > 0 and valid_split is not None
        cache = cfg.data.cache_dir or str(Path(phase.blend.path).parent / "cache")
        train_ds, valid_ds, _ = build_gpt_datasets(phase.blend, [n_train, valid_size if want_valid else 0, 0],
                                                   path_to_cache=cache, **dataset_args)
        train_phases.append((phase.start_iteration, train_ds, global_ids(train_split.names)))
        if want_valid:
            valid = valid_ds
            valid_map = global_ids(valid_split.names)
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
