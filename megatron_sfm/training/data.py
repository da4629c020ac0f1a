"""Training data: the output of ``sfm data mix`` through Megatron-Core's dataset builder.

``data.phases`` + ``data.stage`` (``phases.json`` of ``sfm data mix``) or ``data.blend``
(one blend JSON) name the data; ``megatron_sfm.data_tools.blend`` reads both (source
names come from each blend's ``"sources"``) and builds the datasets. Before anything is
built, :func:`build_data` checks the run against what the data was mixed for:

* a stage of a phases file states ``seq_length``, ``global_batch_size`` and
  ``iterations``: ``model.seq_length``, ``training.global_batch_size`` and
  ``training.train_iters`` must equal them (one error line lists every mismatch);
* the dataset seed is the one the data carries (phases.json / blend ``"seed"``: the mix
  spec's ``seed``); ``data.split_seed`` only seeds data without one, and a different
  value from the data's is refused;
* every dataset: files, sizes and token ids (``megatron_sfm.training.data_checks``).

A phase trains on its own blend from its start iteration to the next phase's start (or
``train_iters``).

Samples are addressed by a *global sample index*: iteration ``i`` consumes indices
``[i*G, (i+1)*G)`` (G = global batch size). Micro-batch ``m`` of data-parallel rank
``r`` holds ``i*G + m*M*D + r*M + [0, M)`` (M = micro-batch size, D = data-parallel
size), which is Megatron-LM's pretraining sampler order. Resume therefore needs only the
number of consumed samples, and every layout sees the same micro-batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_sfm.config.schema import RunConfig
from megatron_sfm.data_tools.blend import (
    Phase,
    SimpleTokenizer,
    StagePlan,
    build_gpt_datasets,
    read_blend,
    read_phases,  # noqa: F401 - the trainer's name for it (tests, tools)
    read_stage,
)
from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

DEFAULT_SEED = 1234


def check_stage_matches(plan: StagePlan, cfg: RunConfig, seq_length: int) -> None:
    """Refuse a run whose sizes differ from what the stage was mixed for (one line, every mismatch)."""
    t = cfg.training
    pairs = [("training.train_iters", t.train_iters, plan.iterations),
             ("training.global_batch_size", t.global_batch_size, plan.global_batch_size),
             ("model.seq_length", seq_length, plan.seq_length)]
    wrong = [f"{key}={have} (stage: {want})" for key, have, want in pairs if want is not None and have != want]
    if wrong:
        name = f"stage {plan.stage!r}" if plan.stage else "the stage"
        raise SfmError(f"data.phases: {plan.path}: {name} was mixed for other sizes: {', '.join(wrong)}; "
                       "set them to the stage's values (or re-run sfm data mix)")


def resolve_seed(cfg_seed: Optional[int], data_seed: Optional[int], where: str) -> int:
    """The dataset seed: the data's (the mix spec's), else ``data.split_seed``, else 1234."""
    if data_seed is None:
        return DEFAULT_SEED if cfg_seed is None else cfg_seed
    if cfg_seed is not None and cfg_seed != data_seed:
        raise SfmError(f"data.split_seed: {cfg_seed} differs from the seed {data_seed} of {where} (the mix spec's "
                       "seed); drop data.split_seed, or re-run sfm data mix with that seed")
    return data_seed


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

    def phase_at(self, iteration: int) -> int:
        index = 0
        for i, (start, _, _) in enumerate(self.train_phases):
            if iteration >= start:
                index = i
        return index


def check_data(cfg: RunConfig, seq_length: Optional[int] = None) -> None:
    """Everything :func:`build_data` checks, without building a dataset: the stage's sizes,
    the seed, and every dataset (files, sizes, token ids). The trainer calls it before it
    builds the model, so bad data fails in seconds, not after a 6.9B model is built.

    Under torch.distributed the dataset checks (which scan a ``.bin`` without a
    ``.stats.json`` sidecar) run on global rank 0 only, and every rank raises its verdict.
    """
    if cfg.data.mock:
        return
    phases, _ = _resolve_phases(cfg, seq_length or cfg.model.seq_length)
    _check_phase_datasets(phases, cfg.model.vocab_size)


def data_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """What the run's data *is*, independent of the path it is reached by: ``{"data.blend":
    sha256}`` of the blend file's bytes, or ``{"data.phases": sha256}`` over the stage's
    phases (start iterations and each phase's blend file bytes, in order). Empty for mock
    data. Checkpoints record it (``train_state.json`` ``data_sha256``) so that a resume
    compares the data, not the path string (``training/checkpoint.py``)."""
    import hashlib
    import json

    def file_sha(path: str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    if cfg.data.mock:
        return {}
    if cfg.data.phases:
        plan = read_stage(cfg.data.phases, cfg.data.stage)
        parts = [[phase.start_iteration, file_sha(phase.blend.path)] for phase in plan.phases]
        return {"data.phases": hashlib.sha256(json.dumps(parts).encode()).hexdigest()}
    if cfg.data.blend:
        return {"data.blend": file_sha(cfg.data.blend)}
    return {}


def _resolve_phases(cfg: RunConfig, seq: int) -> tuple[list[Phase], int]:
    """The phases the run trains on and the dataset seed, checked against the run."""
    t = cfg.training
    if cfg.data.phases:
        plan = read_stage(cfg.data.phases, cfg.data.stage)
        check_stage_matches(plan, cfg, seq)
        phases = plan.phases
        if phases[-1].start_iteration >= t.train_iters:  # the short form states no iterations
            raise SfmError(f"data.phases: {cfg.data.phases}: phase start {phases[-1].start_iteration} is not "
                           f"before training.train_iters {t.train_iters}")
        return phases, resolve_seed(cfg.data.split_seed, plan.seed, cfg.data.phases)
    if cfg.data.blend:
        blend = read_blend(cfg.data.blend)
        return [Phase(0, blend=blend)], resolve_seed(cfg.data.split_seed, blend.seed, cfg.data.blend)
    raise SfmError("data: set data.blend (a blend JSON from 'sfm data mix'), data.phases, or data.mock: true")


def _check_phase_datasets(phases: list[Phase], vocab_size: int) -> None:
    """Every dataset a split draws from (weight > 0), checked once: on global rank 0 when
    torch.distributed is up (the verdict is broadcast; every rank raises the same error)."""
    import torch.distributed as dist

    from megatron_sfm.training.data_checks import check_datasets

    used = []  # (prefix, the blend that names it)
    for phase in phases:
        for sb in phase.blend.splits.values():
            sb = sb.nonzero() if sb is not None else None
            used += [(prefix, phase.blend.path) for prefix in (sb.prefixes if sb is not None else [])]
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        check_datasets(used, vocab_size)
        return
    verdict: list[Optional[str]] = [None]
    if dist.get_rank() == 0:
        try:
            check_datasets(used, vocab_size)
        except SfmError as exc:
            verdict[0] = str(exc)
        except Exception as exc:  # noqa: BLE001 - the other ranks must not wait for a verdict forever
            verdict[0] = f"data check: {type(exc).__name__}: {exc}"
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise SfmError(verdict[0])


def build_data(cfg: RunConfig, seq_length: Optional[int] = None, *, checked: bool = False) -> DataSources:
    """Build the train phases and the validation dataset (on every rank; cheap index files).

    Sizes: each phase gets exactly the samples its iterations consume; validation gets
    ``eval_iters`` global batches per evaluation. ``checked``: :func:`check_data` ran
    already, so the dataset checks are not repeated.
    """
    from megatron_sfm.training.loss import weight_vector

    t = cfg.training
    g = t.global_batch_size
    n_evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval > 0 else 0
    valid_size = n_evals * t.eval_iters * g
    seq = seq_length or cfg.model.seq_length
    tokenizer = SimpleTokenizer(cfg.model.vocab_size, cfg.data.eod_token_id, cfg.data.pad_token_id)
    if cfg.data.mock:
        dataset_args = dict(seq_length=seq, seed=resolve_seed(cfg.data.split_seed, None, ""), tokenizer=tokenizer)
        train, valid, _ = build_gpt_datasets(None, [t.train_iters * g, max(valid_size, 1), 1],
                                             path_to_cache=cfg.data.cache_dir, **dataset_args)
        weights = weight_vector(["mock"], cfg.data.source_loss_weights, "data.source_loss_weights")
        return DataSources(train_phases=[(0, train, [0])], valid=valid if valid_size else None,
                           valid_source_map=[0], source_names=["mock"], global_batch_size=g,
                           train_loss_weights=[weights])
    phases, seed = _resolve_phases(cfg, seq)
    if not checked:
        _check_phase_datasets(phases, cfg.model.vocab_size)
    dataset_args = dict(seq_length=seq, seed=seed, tokenizer=tokenizer)
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
