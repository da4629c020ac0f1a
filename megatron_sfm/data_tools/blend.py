"""The files ``sfm data mix`` writes and the trainer reads: the one reader (and writer) of
blends and phases, and Megatron-Core datasets from them.

A *blend* is JSON in Megatron-LM's per-split data-args format, ``{"train": [w1, prefix1,
w2, prefix2, ...], "valid": [...], "test": [...]}`` (prefixes of Megatron ``.bin``/``.idx``
pairs; relative prefixes are resolved against the blend file's folder), so
``pretrain_gpt.py --per-split-data-args-path BLEND.json`` reads the same file (it ignores
the other keys). Two optional keys make it self-describing:

* ``"sources"``: the source name of each prefix, in order (a list used for every split, or
  ``{split: list}``); per-source losses and loss weights are keyed by these names. Without
  it a source is named after its prefix's file name. ``sfm data mix`` always writes it.
  A name may label several prefixes (a source spread over several datasets); they count
  as one source.
* ``"seed"``: the dataset seed (Megatron's ``random_seed``: document shuffle and sample
  order). ``sfm data mix`` writes the spec's ``seed``.

A *phases* file (``phases.json`` of ``sfm data mix``) lists, per stage, the stage's
``seq_length``, ``global_batch_size`` and ``iterations`` and its consecutive phases (a
blend each, from ``start_iteration``); see :func:`read_stage`.

This is also the one place that builds Megatron-Core's ``GPTDatasetConfig``; the trainer
(``megatron_sfm.training.data``) builds its datasets through :func:`build_gpt_datasets`.
Megatron-Core, and with it torch, is imported only inside the functions that need it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    seed: Optional[int] = None  # the file's "seed" (sfm data mix: the spec's seed)


@dataclass
class Phase:
    """One phase of a stage: a blend trained on from ``start_iteration`` (relative to the stage).

    ``sfm data mix`` plans phases (``weights``: source name -> sample weight, summing to 1)
    and writes one blend file each; :func:`read_stage` reads them back with ``blend`` set.
    """

    start_iteration: int
    iterations: int = 0  # 0: until the next phase (or the end of training)
    stage: str = ""
    index: int = 0
    samples: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    blend_file: str = ""  # as written in phases.json (relative to it)
    blend: Optional[Blend] = None
    loss_weights: dict[str, float] = field(default_factory=dict)  # {source: w} (phase > stage > condition)


@dataclass
class StagePlan:
    """One stage of a phases file, as the trainer uses it.

    ``seq_length``, ``global_batch_size``, ``iterations`` and ``seed`` are None when the
    file does not say (the short form); the trainer checks its config against the others.
    """

    path: str
    stage: Optional[str]
    phases: list[Phase]
    seq_length: Optional[int] = None
    global_batch_size: Optional[int] = None
    iterations: Optional[int] = None
    seed: Optional[int] = None


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
    from megatron_sfm.utils.readers import read_json as _read

    return _read(path, key=key, expect=None)


def _seed(value: Any, where: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SfmError(f"{where}: 'seed' must be a non-negative integer, got {value!r}")
    return value


def blend_document(weights: dict[str, float], prefixes: dict[str, str], seed: int) -> dict[str, Any]:
    """The blend JSON ``sfm data mix`` writes: ``weights`` (source name -> weight, in order),
    ``prefixes`` (source name -> absolute prefix). Validation and test draw from the same
    blend as training (Megatron builds each split with its own sample count and seed offset)."""
    flat: list = []
    for name, w in weights.items():
        flat += [w, prefixes[name]]
    return {"train": flat, "valid": list(flat), "test": list(flat), "sources": list(weights), "seed": seed}


def read_blend(path: str | os.PathLike) -> Blend:
    """Parse and check a blend JSON file (every prefix's ``.bin`` and ``.idx`` exist).

    Errors are one line naming the file and key (``data.blend: FILE: 'train'[2] ...``).
    """
    path = Path(path)
    data = read_json(path, "data.blend")
    if not isinstance(data, dict) or "train" not in data:
        raise SfmError(f"data.blend: {path}: expected an object with a 'train' list")
    names_raw = data.get("sources")
    if names_raw is not None and not isinstance(names_raw, (list, dict)):
        raise SfmError(f"data.blend: {path}: 'sources' must be a list of source names (or {{split: list}})")
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
        names = names_raw.get(split) if isinstance(names_raw, dict) else names_raw
        if names is None:
            names = [Path(p).name for p in prefixes]
        elif (not isinstance(names, list) or len(names) != len(prefixes)
              or not all(isinstance(n, str) and n for n in names)):
            key = f"'sources'['{split}']" if isinstance(names_raw, dict) else "'sources'"
            raise SfmError(f"data.blend: {path}: {key} must list one source name per prefix of '{split}' "
                           f"({len(prefixes)}), got {names!r}")
        # a name may repeat (one source over several prefixes, e.g. one per slurm-data task);
        # the same prefix twice is a mistake
        twice = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if twice:
            raise SfmError(f"data.blend: {path}: '{split}' lists prefix {twice[0]} twice")
        splits[split] = SplitBlend(prefixes=prefixes, weights=weights, names=list(names))
    if splits["train"] is None:
        raise SfmError(f"data.blend: {path}: the 'train' split is empty")
    return Blend(path=str(path), splits=splits, seed=_seed(data.get("seed"), f"data.blend: {path}"))


def _positive_int(value: Any, where: str, key: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SfmError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def read_stage(path: str | os.PathLike, stage: Optional[str] = None) -> StagePlan:
    """One stage of a phases file, its blends read (:func:`read_blend`).

    ``sfm data mix`` writes ``{"condition", "seed", ["loss_weights"], "stages": [{"stage",
    "kind", "seq_length", "global_batch_size", "iterations", "tokens", "phases": [{"index",
    "start_iteration", "iterations", "samples", "tokens", "blend", "weights"}]}]}`` with
    start iterations relative to the stage; ``stage`` picks one (needed when there are
    several). The short form is ``{"phases": [{"start_iteration": N, "blend": FILE}, ...]}``
    (no sizes, no seed). Blend paths are relative to the phases file. Source names come
    from each blend's ``"sources"``; a phase's ``weights`` must name the same sources.

    Per-source loss weights: an optional ``"loss_weights": {source: w}`` at the top level
    (the condition), on a stage object and on a phase object; the more specific level
    wins per source (phase > stage > condition); sources not named have weight 1.
    """
    from megatron_sfm.training.loss import check_loss_weights

    path = Path(path)
    data = read_json(path, "data.phases")
    where = f"data.phases: {path}"
    if not isinstance(data, (dict, list)):
        raise SfmError(f"{where}: expected an object with 'stages' or 'phases'")
    base_weights = check_loss_weights(data.get("loss_weights"), f"{where}: loss_weights") if isinstance(data, dict) else {}
    seed = _seed(data.get("seed"), where) if isinstance(data, dict) else None
    known: set = set()
    sizes: dict[str, Any] = {}
    if isinstance(data, dict) and "stages" in data:
        stages = data["stages"]
        if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
            raise SfmError(f"{where}: 'stages' must be a list of stage objects")
        for st in stages:
            for ph in st.get("phases") or []:
                if isinstance(ph, dict) and isinstance(ph.get("weights"), dict):
                    known.update(str(k) for k in ph["weights"])
        names = [s.get("stage") for s in stages]
        if stage is None:
            if len(stages) != 1:
                raise SfmError(f"data.stage: {path} has stages {names}; say which one (data.stage=NAME)")
            chosen = stages[0]
        else:
            matches = [s for s in stages if s.get("stage") == stage]
            if not matches:
                raise SfmError(f"data.stage: {stage!r} is not a stage of {path} (stages: {names})")
            chosen = matches[0]
        raw = chosen.get("phases")
        stage_key = f"stages[{stages.index(chosen)}]"
        for key in ("seq_length", "global_batch_size", "iterations"):
            sizes[key] = _positive_int(chosen.get(key), where, f"{stage_key}.{key}")
        base_weights = {**base_weights, **check_loss_weights(chosen.get("loss_weights"),
                                                             f"{where}: {stage_key}.loss_weights")}
        stage_name = chosen.get("stage")
    else:
        raw = data.get("phases") if isinstance(data, dict) else data
        stage_key = ""
        stage_name = None
    if not isinstance(raw, list) or not raw:
        raise SfmError(f"{where}: expected {{\"phases\": [{{\"start_iteration\": N, \"blend\": FILE}}, ...]}}")
    entries = []
    for i, item in enumerate(raw):
        key = f"{stage_key}.phases[{i}]" if stage_key else f"phases[{i}]"
        if not isinstance(item, dict) or "blend" not in item:
            raise SfmError(f"{where}: {key} needs 'blend' and 'start_iteration'")
        start = item.get("start_iteration", item.get("start_iter", 0 if i == 0 else None))
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise SfmError(f"{where}: {key}.start_iteration must be a non-negative integer")
        entries.append((start, key, item))
    starts = [start for start, _, _ in entries]
    if starts[0] != 0:
        raise SfmError(f"{where}: the first phase must start at iteration 0")
    if starts != sorted(set(starts)):
        raise SfmError(f"{where}: start iterations must increase, got {starts}")
    if sizes.get("iterations") is not None and starts[-1] >= sizes["iterations"]:
        raise SfmError(f"{where}: phase start {starts[-1]} is not before the stage's {sizes['iterations']} iterations")
    phases = []
    for start, key, item in entries:
        blend_path = item["blend"]
        if not isinstance(blend_path, str):
            raise SfmError(f"{where}: {key}.blend must be a file name, got {blend_path!r}")
        blend = read_blend(blend_path if os.path.isabs(blend_path) else path.parent / blend_path)
        if seed is not None and blend.seed is not None and blend.seed != seed:
            raise SfmError(f"{where}: {key}: blend {blend.path} has seed {blend.seed}, this file {seed}")
        train_names = blend.splits["train"].names
        weights = item.get("weights")
        if isinstance(weights, dict) and set(map(str, weights)) != set(train_names):
            raise SfmError(f"{where}: {key}.weights name sources {sorted(map(str, weights))} but blend {blend.path} "
                           f"names {sorted(train_names)} (re-run 'sfm data mix': blends carry their 'sources')")
        for sb in blend.splits.values():
            if sb is not None:
                known.update(sb.names)
        loss_weights = {**base_weights, **check_loss_weights(item.get("loss_weights"), f"{where}: {key}.loss_weights")}
        phases.append(Phase(start_iteration=start, stage=str(stage_name or ""), index=len(phases),
                            iterations=item.get("iterations") or 0, samples=item.get("samples") or 0,
                            weights={str(k): v for k, v in weights.items()} if isinstance(weights, dict) else {},
                            blend_file=blend_path, blend=blend, loss_weights=loss_weights))
    for phase in phases:
        unknown = sorted(set(phase.loss_weights) - known)
        if unknown:
            raise SfmError(f"{where}: loss_weights name {', '.join(map(repr, unknown))}, which is not a source "
                           f"of this file (sources: {', '.join(sorted(known))})")
    return StagePlan(path=str(path), stage=stage_name, phases=phases, seed=seed, **sizes)


def read_phases(path: str | os.PathLike, train_iters: int, stage: Optional[str] = None) -> list[Phase]:
    """The phases of one stage (:func:`read_stage`); every phase must start before ``train_iters``."""
    plan = read_stage(path, stage)
    last = plan.phases[-1].start_iteration
    if last >= train_iters:
        raise SfmError(f"data.phases: {path}: phase start {last} is not before training.train_iters {train_iters}")
    return plan.phases


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
