"""Experimental conditions: a spec YAML -> per-condition, per-stage blends, phases and manifests.

See docs/data.md ("Mixing") for the spec and output formats. In short:

* ``sources``: named indexed datasets (prefixes) with a role: ``base``, ``filtered``
  (with ``filtered_from: <source>``), ``aligned``, ``misaligned``, ``midtrain``.
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
when a stage has several phases) in Megatron-LM's per-split data-args format,
``phases.json`` and ``manifest.json``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sfm.errors import ConfigError, SfmError

ROLES = ("base", "filtered", "aligned", "misaligned", "midtrain")
SYNTHETIC_ROLES = ("aligned", "misaligned")
STAGE_KINDS = ("pretrain", "midtrain")
WEIGHT_TOLERANCE = 1e-6


@dataclass
class Source:
    name: str
    prefix: str  # absolute
    role: str
    filtered_from: str | None = None
    documents: int = 0
    tokens: int = 0


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


def load_spec(path: str | os.PathLike, *, max_epochs: float | None = None, check_data: bool = True) -> MixSpec:
    """Read and validate a mix spec; prefixes resolve relative to the spec's folder.

    ``check_data`` opens every source's ``.idx`` (documents and tokens available).
    Errors are ConfigError naming the spec file and the key.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: mix spec not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    where = str(path)
    unknown = set(raw) - {"seed", "repetition", "sources", "stages", "conditions"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for key in ("sources", "stages", "conditions"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise ConfigError(f"{where}: key {key!r} must be a non-empty mapping")

    sources: dict[str, Source] = {}
    for name, s in raw["sources"].items():
        key = f"sources.{name}"
        if not isinstance(s, dict) or "prefix" not in s or "role" not in s:
            raise ConfigError(f"{where}: {key} needs 'prefix' and 'role'")
        if s["role"] not in ROLES:
            raise ConfigError(f"{where}: {key}.role {s['role']!r} is not one of {', '.join(ROLES)}")
        prefix = str(s["prefix"])
        for suffix in (".bin", ".idx"):
            prefix = prefix.removesuffix(suffix)
        prefix = str((path.parent / prefix).resolve()) if not os.path.isabs(prefix) else prefix
        src = Source(name, prefix, s["role"], s.get("filtered_from"))
        if src.role == "filtered" and not src.filtered_from:
            raise ConfigError(f"{where}: {key} has role 'filtered' but no 'filtered_from'")
        sources[name] = src
    for src in sources.values():
        if src.filtered_from is not None and src.filtered_from not in sources:
            raise ConfigError(f"{where}: sources.{src.name}.filtered_from names unknown source {src.filtered_from!r}")

    stages = []
    for name, st in raw["stages"].items():
        key = f"stages.{name}"
        if not isinstance(st, dict):
            raise ConfigError(f"{where}: {key} must be a mapping")
        for k in ("tokens", "seq_length", "global_batch_size", "mixture"):
            if k not in st:
                raise ConfigError(f"{where}: {key} is missing {k!r}")
        kind = st.get("kind", "midtrain" if str(name).startswith("mid") else "pretrain")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: {key}.kind {kind!r} is not one of {', '.join(STAGE_KINDS)}")
        tokens = _number(st["tokens"], where, f"{key}.tokens")
        seq = st["seq_length"]
        gbs = st["global_batch_size"]
        if not isinstance(seq, int) or seq <= 0:
            raise ConfigError(f"{where}: {key}.seq_length must be a positive integer")
        if not isinstance(gbs, int) or gbs <= 0:
            raise ConfigError(f"{where}: {key}.global_batch_size must be a positive integer")
        if tokens <= 0:
            raise ConfigError(f"{where}: {key}.tokens must be positive")
        mixture = st["mixture"]
        if not isinstance(mixture, dict) or not mixture:
            raise ConfigError(f"{where}: {key}.mixture must map source names to weights")
        mix = {}
        for sname, w in mixture.items():
            w = _number(w, where, f"{key}.mixture.{sname}")
            if sname not in sources:
                raise ConfigError(f"{where}: {key}.mixture names unknown source {sname!r}")
            if sources[sname].role in SYNTHETIC_ROLES or sources[sname].role == "filtered":
                raise ConfigError(
                    f"{where}: {key}.mixture.{sname}: role {sources[sname].role!r} cannot be in a mixture "
                    "(synthetic sources come from conditions; filtered variants are swapped in by 'corpus: filtered')"
                )
            if w < 0:
                raise ConfigError(f"{where}: {key}.mixture.{sname} is negative ({w})")
            mix[sname] = w
        total = sum(mix.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise ConfigError(f"{where}: {key}.mixture weights sum to {total:g}, expected 1")
        stages.append(Stage(str(name), kind, tokens, seq, gbs, mix))

    conditions = []
    for name, c in raw["conditions"].items():
        key = f"conditions.{name}"
        c = c or {}
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: {key} must be a mapping")
        unknown = set(c) - {"corpus", "synthetic", "timing", "loss_weights"}
        if unknown:
            raise ConfigError(f"{where}: {key}: unknown key {sorted(unknown)[0]!r}")
        corpus = c.get("corpus", "unfiltered")
        if corpus not in ("unfiltered", "filtered"):
            raise ConfigError(f"{where}: {key}.corpus must be 'unfiltered' or 'filtered'")
        synthetic = {}
        for sname, frac in (c.get("synthetic") or {}).items():
            frac = _number(frac, where, f"{key}.synthetic.{sname}")
            if sname not in sources:
                raise ConfigError(f"{where}: {key}.synthetic names unknown source {sname!r}")
            if sources[sname].role not in SYNTHETIC_ROLES:
                raise ConfigError(f"{where}: {key}.synthetic.{sname}: source role is {sources[sname].role!r}, expected aligned or misaligned")
            if frac < 0:
                raise ConfigError(f"{where}: {key}.synthetic.{sname} is a negative fraction ({frac})")
            synthetic[sname] = frac
        if sum(synthetic.values()) >= 1.0:
            raise ConfigError(f"{where}: {key}.synthetic fractions sum to {sum(synthetic.values()):g}; must be below 1")
        timing = str(c.get("timing", "e2e"))
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
        raw_weights = c.get("loss_weights") or {}
        if not isinstance(raw_weights, dict):
            raise ConfigError(f"{where}: {key}.loss_weights must be a mapping of source -> weight")
        for sname, w in raw_weights.items():
            w = _number(w, where, f"{key}.loss_weights.{sname}")
            if sname not in sources:
                raise ConfigError(f"{where}: {key}.loss_weights names unknown source {sname!r}")
            if w < 0:
                raise ConfigError(f"{where}: {key}.loss_weights.{sname} is negative ({w})")
            loss_weights[str(sname)] = w
        conditions.append(Condition(str(name), corpus, synthetic, timing, late, loss_weights))

    rep = raw.get("repetition") or {}
    warn_epochs = _number(rep.get("warn_epochs", 1.0), where, "repetition.warn_epochs")
    max_ep = _number(rep.get("max_epochs", 4.0), where, "repetition.max_epochs") if max_epochs is None else max_epochs
    seed = raw.get("seed", 1234)
    if not isinstance(seed, int):
        raise ConfigError(f"{where}: seed must be an integer")
    spec = MixSpec(str(path), sources, stages, conditions, seed, warn_epochs, max_ep)
    if check_data:
        _read_sizes(spec)
    return spec


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{where}: {key} must be a number")
    return float(value)


def _read_sizes(spec: MixSpec) -> None:
    from megatron_sfm.data_tools.indexed import read_index

    for src in spec.sources.values():
        try:
            data = read_index(src.prefix)
        except SfmError as exc:
            raise ConfigError(f"{spec.path}: sources.{src.name}: {exc}") from None
        src.documents, src.tokens = data.num_documents, data.num_tokens
        if src.tokens == 0:
            raise ConfigError(f"{spec.path}: sources.{src.name}: dataset {src.prefix} holds no tokens")


# ----------------------------------------------------------------------------- planning


@dataclass
class Phase:
    stage: str
    index: int
    start_iteration: int
    iterations: int
    samples: int
    weights: dict[str, float]  # source name -> sample weight (sums to 1)
    blend_file: str = ""


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
            phases.append(Phase(stage.name, k, start, n, n * stage.global_batch_size, weights))
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


def blend_json(spec: MixSpec, weights: dict[str, float]) -> dict[str, list]:
    """Megatron-LM's per-split data-args JSON: ``{"train": [w1, prefix1, ...], "valid": ..., "test": ...}``.

    Validation and test draw from the same blend as training (Megatron builds each split
    with its own sample count and seed offset).
    """
    flat: list = []
    for name, w in weights.items():
        flat += [w, spec.sources[name].prefix]
    return {"train": flat, "valid": list(flat), "test": list(flat)}


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


def write_mix(spec: MixSpec, out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Write every condition's blends, phases.json and manifest.json; return the manifests.

    Raises ConfigError (after writing nothing) if any source would repeat more than
    ``max_epochs`` times in any condition.
    """
    from megatron_sfm.utils.io import atomic_path, write_json

    plans = {}
    for cond in spec.conditions:
        phases = plan_condition(spec, cond)
        plans[cond.name] = (cond, phases, manifest(spec, cond, phases))
    errors = [f"{name}: {e}" for name, (_, _, m) in plans.items() for e in m["errors"]]
    if errors:
        raise ConfigError(f"{spec.path}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    out = Path(out_dir)
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
