"""Experimental conditions: a spec YAML -> per-condition, per-stage blends, phases and manifests.

See docs/data.md ("Mixing") for the spec and output formats. In short:

* ``sources``: named indexed datasets (prefixes) with a role: ``base``, ``filtered``
  (with ``filtered_from: <source>``), ``aligned``, ``misaligned``, ``midtrain``. A
  source's ``prefix`` may be a list (or a ``prefixes.json`` of ``sfm launch slurm-data
  tokenize``): one source over several datasets, its tokens summed, its blend weight
  split over the prefixes by size, every entry under the source's name.
* ``stages`` (in training order): token budget, ``seq_length``, ``global_batch_size``
  and a ``mixture`` of non-synthetic sources whose weights sum to 1.
* ``conditions``: ``corpus`` (``unfiltered`` or ``filtered``), optional ``synthetic``
  (source -> token fraction) and ``timing`` (``e2e``, ``midtrain`` or ``late:<f>``).

A filtered condition swaps each mixture source for its filtered variant at the same
weight, so the stage's token budget is unchanged and the retained documents are
resampled (more epochs of the smaller corpus). Synthetic sources take their fraction of
each phase they are in; the mixture shares the rest. Weights are per sample, and every
sample holds ``seq_length`` tokens, so sample weights are token fractions.

Outputs per condition (``DIR/<condition>/``): ``<stage>.json`` (or ``<stage>.phase<k>.json``
when a stage has several phases) in Megatron-LM's per-split data-args format plus the
source name of each prefix (``"sources"``) and the spec's ``"seed"``
(:func:`megatron_sfm.data_tools.blend.blend_document`); ``phases.json`` (per stage: its
``seq_length``, ``global_batch_size``, ``iterations`` and phases, which the trainer reads
with :func:`megatron_sfm.data_tools.blend.read_stage` and checks its config against);
and ``manifest.json``. The spec is parsed by the run config's typed machinery
(:class:`SpecFile`), with ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from megatron_sfm.data_tools.blend import Phase, blend_document
from megatron_sfm.errors import ConfigError, SfmError

Role = Literal["base", "filtered", "aligned", "misaligned", "midtrain"]
StageKind = Literal["pretrain", "midtrain"]
ROLES = typing.get_args(Role)
SYNTHETIC_ROLES = ("aligned", "misaligned")
STAGE_KINDS = typing.get_args(StageKind)
WEIGHT_TOLERANCE = 1e-6


@dataclass
class Source:
    name: str
    prefixes: list[str]  # absolute; one source may span several (e.g. one per sfm launch slurm-data task)
    role: str
    filtered_from: str | None = None
    documents: int = 0
    tokens: int = 0
    prefix_tokens: list[int] = field(default_factory=list)  # tokens of each prefix (read from the .idx)

    @property
    def prefix(self) -> str | list[str]:
        """The prefix, or the list of prefixes of a multi-prefix source (as in manifests)."""
        return self.prefixes[0] if len(self.prefixes) == 1 else list(self.prefixes)

    def shares(self) -> list[tuple[str, float]]:
        """(prefix, fraction of the source's tokens): a source's blend weight is split by size."""
        if len(self.prefixes) == 1:
            return [(self.prefixes[0], 1.0)]
        total = sum(self.prefix_tokens) if len(self.prefix_tokens) == len(self.prefixes) else 0
        if not total:  # sizes not read (check_data=False): equal parts
            return [(p, 1.0 / len(self.prefixes)) for p in self.prefixes]
        return [(p, t / total) for p, t in zip(self.prefixes, self.prefix_tokens)]


@dataclass
class Stage:
    name: str
    kind: str
    tokens: float
    seq_length: int
    global_batch_size: int
    mixture: dict[str, float]

    @property
    def iterations(self) -> int:
        return max(1, round(self.tokens / (self.seq_length * self.global_batch_size)))


@dataclass
class Condition:
    name: str
    corpus: str  # "unfiltered" or "filtered"
    synthetic: dict[str, float] = field(default_factory=dict)
    timing: str = "e2e"
    late_fraction: float | None = None
    # per-source loss weights (trainer: sum(w * CE) / tokens); an alternative to
    # repeating a source's documents. Written to phases.json as "loss_weights".
    loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class MixSpec:
    path: str
    sources: dict[str, Source]
    stages: list[Stage]
    conditions: list[Condition]
    seed: int = 1234
    warn_epochs: float = 1.0
    max_epochs: float = 4.0


# ----------------------------------------------------------------------------- parsing
# The spec file's schema, read by the run config's typed machinery
# (megatron_sfm.config.loader.dataclass_from_dict): unknown keys with a "did you mean",
# types, required keys, and KEY=VALUE overrides. Cross-references and sums are checked below.


@dataclass
class SourceSpec:
    # one prefix, a list of prefixes (one source over several datasets, e.g. the per-task
    # prefixes of `sfm launch slurm-data tokenize`), or that run's prefixes.json
    prefix: str | list[str]
    role: Role
    filtered_from: Optional[str] = None


@dataclass
class StageSpec:
    tokens: float
    seq_length: int
    global_batch_size: int
    mixture: dict[str, float]
    kind: Optional[StageKind] = None  # None: midtrain if the name starts with "mid"


@dataclass
class ConditionSpec:
    corpus: Literal["unfiltered", "filtered"] = "unfiltered"
    synthetic: dict[str, float] = field(default_factory=dict)
    timing: str = "e2e"
    loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class RepetitionSpec:
    warn_epochs: float = 1.0
    max_epochs: float = 4.0


@dataclass
class SpecFile:
    sources: dict[str, SourceSpec]
    stages: dict[str, StageSpec]
    conditions: dict[str, ConditionSpec]  # an empty condition (``name:``) takes the defaults
    seed: int = 1234  # Megatron's dataset seed (shuffle, sample order); the trainer uses it
    repetition: RepetitionSpec = field(default_factory=RepetitionSpec)


def load_spec(path: str | os.PathLike, *, max_epochs: float | None = None, check_data: bool = True,
              overrides: list[str] | None = None) -> MixSpec:
    """Read and validate a mix spec; prefixes resolve relative to the spec's folder.

    ``overrides``: ``KEY=VALUE`` strings applied before checking (``seed=7``,
    ``stages.pretrain.tokens=1e9``). ``check_data`` opens every source's ``.idx``
    (documents and tokens available). Errors are ConfigError naming the spec file and the key.
    """
    from megatron_sfm.config.loader import apply_overrides, dataclass_from_dict
    from megatron_sfm.utils.readers import read_yaml

    path = Path(path)
    where = str(path)
    raw = read_yaml(path, error=ConfigError)
    raw = apply_overrides(raw, list(overrides or []))
    for key in ("sources", "stages", "conditions"):
        if raw.get(key) == {}:
            raise ConfigError(f"{where}: key {key!r} must be a non-empty mapping")
    if isinstance(raw.get("conditions"), dict):
        raw["conditions"] = {k: ({} if v is None else v) for k, v in raw["conditions"].items()}
    doc: SpecFile = dataclass_from_dict(SpecFile, raw, where)

    sources: dict[str, Source] = {}
    for name, s in doc.sources.items():
        src = Source(str(name), _source_prefixes(path, f"sources.{name}.prefix", s.prefix), s.role, s.filtered_from)
        if src.role == "filtered" and not src.filtered_from:
            raise ConfigError(f"{where}: sources.{name} has role 'filtered' but no 'filtered_from'")
        sources[str(name)] = src
    for src in sources.values():
        if src.filtered_from is not None and src.filtered_from not in sources:
            raise ConfigError(f"{where}: sources.{src.name}.filtered_from names unknown source {src.filtered_from!r}")

    stages = []
    for name, st in doc.stages.items():
        key = f"stages.{name}"
        kind = st.kind or ("midtrain" if str(name).startswith("mid") else "pretrain")
        if not math.isfinite(st.tokens) or st.tokens <= 0:
            raise ConfigError(f"{where}: {key}.tokens must be positive")
        if st.seq_length <= 0:
            raise ConfigError(f"{where}: {key}.seq_length must be a positive integer")
        if st.global_batch_size <= 0:
            raise ConfigError(f"{where}: {key}.global_batch_size must be a positive integer")
        if not st.mixture:
            raise ConfigError(f"{where}: {key}.mixture must map source names to weights")
        mix = {}
        for sname, w in st.mixture.items():
            if sname not in sources:
                raise ConfigError(f"{where}: {key}.mixture names unknown source {sname!r}")
            if sources[sname].role in SYNTHETIC_ROLES or sources[sname].role == "filtered":
                raise ConfigError(
                    f"{where}: {key}.mixture.{sname}: role {sources[sname].role!r} cannot be in a mixture "
                    "(synthetic sources come from conditions; filtered variants are swapped in by 'corpus: filtered')"
                )
            if not w >= 0:
                raise ConfigError(f"{where}: {key}.mixture.{sname} is negative ({w})")
            mix[str(sname)] = w
        total = sum(mix.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise ConfigError(f"{where}: {key}.mixture weights sum to {total:g}, expected 1")
        stages.append(Stage(str(name), kind, st.tokens, st.seq_length, st.global_batch_size, mix))

    conditions = []
    for name, c in doc.conditions.items():
        key = f"conditions.{name}"
        synthetic = {}
        for sname, frac in c.synthetic.items():
            if sname not in sources:
                raise ConfigError(f"{where}: {key}.synthetic names unknown source {sname!r}")
            if sources[sname].role not in SYNTHETIC_ROLES:
                raise ConfigError(f"{where}: {key}.synthetic.{sname}: source role is {sources[sname].role!r}, "
                                  "expected aligned or misaligned")
            if not frac >= 0:
                raise ConfigError(f"{where}: {key}.synthetic.{sname} is a negative fraction ({frac})")
            synthetic[str(sname)] = frac
        if sum(synthetic.values()) >= 1.0:
            raise ConfigError(f"{where}: {key}.synthetic fractions sum to {sum(synthetic.values()):g}; must be below 1")
        timing = c.timing
        late = None
        if timing.startswith("late:"):
            try:
                late = float(timing.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"{where}: {key}.timing {timing!r}: expected late:<fraction>") from None
            if not 0 < late <= 1:
                raise ConfigError(f"{where}: {key}.timing {timing!r}: fraction must be in (0, 1]")
        elif timing not in ("e2e", "midtrain"):
            raise ConfigError(f"{where}: {key}.timing {timing!r} is not e2e, midtrain or late:<fraction>")
        if timing == "midtrain" and synthetic and not any(s.kind == "midtrain" for s in stages):
            raise ConfigError(f"{where}: {key}.timing is 'midtrain' but no stage has kind 'midtrain'")
        loss_weights = {}
        for sname, w in c.loss_weights.items():
            if sname not in sources:
                raise ConfigError(f"{where}: {key}.loss_weights names unknown source {sname!r}")
            if not (w >= 0 and math.isfinite(w)):
                raise ConfigError(f"{where}: {key}.loss_weights.{sname} is negative ({w})")
            loss_weights[str(sname)] = w
        conditions.append(Condition(str(name), c.corpus, synthetic, timing, late, loss_weights))

    rep = doc.repetition
    max_ep = rep.max_epochs if max_epochs is None else max_epochs
    if doc.seed < 0:
        raise ConfigError(f"{where}: seed must be a non-negative integer")
    spec = MixSpec(str(path), sources, stages, conditions, doc.seed, rep.warn_epochs, max_ep)
    if check_data:
        _read_sizes(spec)
    return spec


def _resolve_prefix(spec_path: Path, prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        prefix = prefix.removesuffix(suffix)
    return str((spec_path.parent / prefix).resolve()) if not os.path.isabs(prefix) else prefix


def _source_prefixes(spec_path: Path, key: str, value: str | list[str]) -> list[str]:
    """A source's absolute prefixes: one, a list, or the ``prefixes`` of a prefixes.json
    (``sfm launch slurm-data tokenize``; its relative prefixes resolve against its folder)."""
    where = f"{spec_path}: {key}"
    if isinstance(value, str) and value.endswith(".json"):
        from megatron_sfm.utils.readers import read_json

        file = Path(_resolve_prefix(spec_path, value))
        data = read_json(file, key=key, error=ConfigError)
        items = data.get("prefixes") if isinstance(data, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
            raise ConfigError(f"{where}: {file} has no 'prefixes' list of dataset prefixes")
        return [_resolve_prefix(file, p) for p in items]
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(items):
        raise ConfigError(f"{where}: expected a prefix or a non-empty list of prefixes")
    out = [_resolve_prefix(spec_path, p) for p in items]
    dupes = sorted({p for p in out if out.count(p) > 1})
    if dupes:
        raise ConfigError(f"{where}: lists {dupes[0]} twice")
    return out


def _read_sizes(spec: MixSpec) -> None:
    from megatron_sfm.data_tools.indexed import read_index

    for src in spec.sources.values():
        src.documents, src.tokens, src.prefix_tokens = 0, 0, []
        for i, prefix in enumerate(src.prefixes):
            key = f"sources.{src.name}" + (f".prefix[{i}]" if len(src.prefixes) > 1 else "")
            try:
                data = read_index(prefix)
            except SfmError as exc:
                raise ConfigError(f"{spec.path}: {key}: {exc}") from None
            if data.num_tokens == 0:
                raise ConfigError(f"{spec.path}: {key}: dataset {prefix} holds no tokens")
            src.documents += data.num_documents
            src.tokens += data.num_tokens
            src.prefix_tokens.append(data.num_tokens)


# ----------------------------------------------------------------------------- planning


def plan_condition(spec: MixSpec, cond: Condition) -> list[Phase]:
    """The phases of every stage for one condition, with per-source weights."""
    stage_tokens = [s.iterations * s.global_batch_size * s.seq_length for s in spec.stages]
    total = sum(stage_tokens)
    late_from = None if cond.late_fraction is None else (1.0 - cond.late_fraction) * total
    phases: list[Phase] = []
    start_tokens = 0
    for stage, tokens in zip(spec.stages, stage_tokens):
        base = _corpus_weights(spec, cond, stage)
        with_syn = _with_synthetic(base, cond.synthetic)
        iters = stage.iterations
        if not cond.synthetic:
            segments = [(0, iters, base)]
        elif cond.timing == "e2e":
            segments = [(0, iters, with_syn)]
        elif cond.timing == "midtrain":
            segments = [(0, iters, with_syn if stage.kind == "midtrain" else base)]
        else:  # late:<f> over the whole run, all stages in order
            tokens_per_iter = stage.global_batch_size * stage.seq_length
            if start_tokens + tokens <= late_from:
                segments = [(0, iters, base)]
            elif start_tokens >= late_from:
                segments = [(0, iters, with_syn)]
            else:
                split = min(iters - 1, max(1, round((late_from - start_tokens) / tokens_per_iter)))
                segments = [(0, split, base), (split, iters - split, with_syn)]
        for k, (start, n, weights) in enumerate(segments):
            phases.append(Phase(start_iteration=start, iterations=n, stage=stage.name, index=k,
                                samples=n * stage.global_batch_size, weights=weights))
        start_tokens += tokens
    return phases


def _corpus_weights(spec: MixSpec, cond: Condition, stage: Stage) -> dict[str, float]:
    weights: dict[str, float] = {}
    for name, w in stage.mixture.items():
        if w == 0:
            continue
        if cond.corpus == "filtered":
            variants = [s.name for s in spec.sources.values() if s.role == "filtered" and s.filtered_from == name]
            if len(variants) > 1:
                raise ConfigError(f"{spec.path}: sources {variants} are all filtered variants of {name!r}; keep one")
            if variants:
                name = variants[0]
        weights[name] = weights.get(name, 0.0) + w
    return weights


def _with_synthetic(base: dict[str, float], synthetic: dict[str, float]) -> dict[str, float]:
    rest = 1.0 - sum(synthetic.values())
    out = {k: w * rest for k, w in base.items()}
    for k, f in synthetic.items():
        if f > 0:
            out[k] = out.get(k, 0.0) + f
    return out


def blend_json(spec: MixSpec, weights: dict[str, float]) -> dict[str, Any]:
    """One phase's blend file (:func:`megatron_sfm.data_tools.blend.blend_document`): Megatron-LM's
    per-split data-args format plus ``"sources"`` (names, in prefix order) and ``"seed"``.

    A source over several prefixes gets one entry per prefix, all under the source's name,
    its weight split in proportion to the prefixes' tokens (so every prefix is drawn at the
    same epoch rate and the source's share is its weight)."""
    if all(len(spec.sources[name].prefixes) == 1 for name in weights):
        return blend_document(weights, {name: spec.sources[name].prefixes[0] for name in weights}, spec.seed)
    flat: list[Any] = []
    names: list[str] = []
    for name, w in weights.items():
        for prefix, share in spec.sources[name].shares():
            flat += [w * share, prefix]
            names.append(name)
    return {"train": flat, "valid": list(flat), "test": list(flat), "sources": names, "seed": spec.seed}


def missing_variants(spec: MixSpec, cond: Condition) -> list[str]:
    """Mixture sources a filtered condition has to use unfiltered (no filtered variant given)."""
    if cond.corpus != "filtered":
        return []
    have = {s.filtered_from for s in spec.sources.values() if s.role == "filtered"}
    return sorted({n for st in spec.stages for n, w in st.mixture.items() if w > 0 and n not in have})


def manifest(spec: MixSpec, cond: Condition, phases: list[Phase]) -> dict[str, Any]:
    """Per source: tokens available and planned, samples and epochs (over all stages and per stage)."""
    seq = {s.name: s.seq_length for s in spec.stages}
    per_source: dict[str, dict[str, Any]] = {}
    for ph in phases:
        for name, w in ph.weights.items():
            src = spec.sources[name]
            entry = per_source.setdefault(
                name,
                {"prefix": src.prefix, "role": src.role, "documents": src.documents, "tokens_available": src.tokens,
                 "tokens_planned": 0, "samples": 0.0, "epochs": 0.0, "by_stage": {}},
            )
            samples = w * ph.samples
            tokens = samples * seq[ph.stage]
            entry["samples"] += samples
            entry["tokens_planned"] += tokens
            st = entry["by_stage"].setdefault(ph.stage, {"samples": 0.0, "tokens_planned": 0.0, "epochs": 0.0})
            st["samples"] += samples
            st["tokens_planned"] += tokens
    warnings, errors = [], []
    for name, e in per_source.items():
        avail = max(e["tokens_available"], 1)
        e["epochs"] = e["tokens_planned"] / avail
        for st in e["by_stage"].values():
            st["epochs"] = st["tokens_planned"] / avail
        e["tokens_planned"] = int(round(e["tokens_planned"]))
        e["samples"] = int(round(e["samples"]))
        if e["epochs"] > spec.max_epochs:
            errors.append(f"source {name!r} would be repeated {e['epochs']:.2f} times (max_epochs {spec.max_epochs:g})")
        elif e["epochs"] > spec.warn_epochs:
            warnings.append(f"source {name!r} is repeated {e['epochs']:.2f} times (over {spec.warn_epochs:g} epochs)")
    for name in missing_variants(spec, cond):
        warnings.append(f"source {name!r} has no filtered variant; the filtered condition uses it unfiltered")
    return {
        "condition": cond.name,
        "corpus": cond.corpus,
        "synthetic": dict(cond.synthetic),
        "timing": cond.timing,
        "seed": spec.seed,
        "warn_epochs": spec.warn_epochs,
        "max_epochs": spec.max_epochs,
        "sources": per_source,
        "warnings": warnings,
        "errors": errors,
    }


def write_mix(spec: MixSpec, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Write every condition's blends, phases.json and manifest.json; return the manifests.

    Raises ConfigError (after writing nothing) if any source would repeat more than
    ``max_epochs`` times in any condition. ``out_dir`` must be missing or empty unless
    ``overwrite``; it is built in a temporary sibling and renamed into place at the end.
    """
    from megatron_sfm.utils.io import check_output_dir, output_dir

    check_output_dir(out_dir, overwrite=overwrite)

    plans = {}
    for cond in spec.conditions:
        phases = plan_condition(spec, cond)
        plans[cond.name] = (cond, phases, manifest(spec, cond, phases))
    errors = [f"{name}: {e}" for name, (_, _, m) in plans.items() for e in m["errors"]]
    if errors:
        raise ConfigError(f"{spec.path}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    with output_dir(out_dir, overwrite=overwrite) as out:
        return _write_plans(plans, spec, out)


def _write_plans(plans, spec: MixSpec, out: Path) -> dict[str, dict[str, Any]]:
    from megatron_sfm.utils.io import atomic_path, write_json

    manifests = {}
    for name, (cond, phases, man) in plans.items():
        final = out / name
        with atomic_path(final, is_dir=True) as tmp:
            stages_out = []
            for stage in spec.stages:
                mine = [p for p in phases if p.stage == stage.name]
                entries = []
                for p in mine:
                    p.blend_file = f"{stage.name}.json" if len(mine) == 1 else f"{stage.name}.phase{p.index}.json"
                    write_json(tmp / p.blend_file, blend_json(spec, p.weights))
                    entries.append(
                        {"index": p.index, "start_iteration": p.start_iteration, "iterations": p.iterations,
                         "samples": p.samples, "tokens": p.samples * stage.seq_length, "blend": p.blend_file,
                         "weights": p.weights}
                    )
                stages_out.append(
                    {"stage": stage.name, "kind": stage.kind, "seq_length": stage.seq_length,
                     "global_batch_size": stage.global_batch_size, "iterations": stage.iterations,
                     "tokens": stage.iterations * stage.global_batch_size * stage.seq_length, "phases": entries}
                )
            phases_doc = {"condition": name, "seed": spec.seed, "stages": stages_out}
            if cond.loss_weights:
                phases_doc["loss_weights"] = dict(cond.loss_weights)
            write_json(tmp / "phases.json", phases_doc)
            write_json(tmp / "manifest.json", man)
        manifests[name] = man
    return manifests


def summary_table(manifests: dict[str, dict[str, Any]]):
    """A rich Table: per condition and source, tokens planned/available and epochs."""
    from rich.table import Table

    table = Table(title="data mix")
    for col in ("condition", "source", "role", "tokens planned", "tokens available", "epochs"):
        table.add_column(col, justify="right" if col.startswith(("tokens", "epochs")) else "left")
    for cond, man in manifests.items():
        for name, e in man["sources"].items():
            table.add_row(cond, name, e["role"], f"{e['tokens_planned']:,}", f"{e['tokens_available']:,}", f"{e['epochs']:.3f}")
    return table
