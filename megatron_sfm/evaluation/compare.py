"""Misalignment propensity across post-training stages (``sfm eval compare``).

Input: one ``sfm eval propensity`` report folder per stage (``base``, ``sft``, ``dpo``, ...),
each holding one model per data condition, labelled by the condition (the labels are
matched across folders). A stage is read as its folder was measured: the base models
usually in log-prob mode (persona ``ai``), the chat models in generate mode under the
persona asked for (``persona``; a generate-mode folder must hold it).

Output (:func:`write_comparison`): ``results.json`` (kind ``sfm-eval-compare``; the source
cells copied unchanged), ``results.md`` (per split: condition x topic rows, one column per
stage, its mode and persona in the header; non-match rates per run and split) and
``compare.png`` (one panel per condition and split, one bar per stage). Runs excluded by
the non-match rule stay excluded here: marked in every table, never drawn as a rate.

Checksums: each input model's ``checksums_verified`` (as its stage report recorded it;
unknown when the report has none) is carried into its cell, and ``checksums`` sums them
up: a comparison resting on any unverified weights says so in results.json and in a line
at the top of results.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.evaluation.formats import persona_text
from megatron_sfm.evaluation.propensity import (
    DEFAULT_PERSONA,
    MODES,
    iter_runs,
    section_for_mode,
    section_personas,
)
from megatron_sfm.evaluation.report import (
    CHECKSUMS_TEXT,
    PROPENSITY_SECTIONS,
    RESULTS_JSON,
    RESULTS_MD,
    cell_text,
    draw_grouped_bars,
    non_match_text,
    split_columns,
    split_non_match,
)
from megatron_sfm.utils.io import atomic_path, check_output_dir, output_dir, write_json

COMPARE_KIND = "sfm-eval-compare"
COMPARE_PNG = "compare.png"
MODE_NAMES = {"logprob": "letter log-probabilities", "likelihood": "option likelihood (not the paper's protocol)",
              "generate": "generated letters"}


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name, its report folder, and (optionally) which mode's section to read."""

    stage: str
    folder: Path
    mode: str | None = None  # None: the letter section (``propensity``), else the only section there is

    @property
    def text(self) -> str:
        """As written on the command line: ``STAGE[:MODE]=DIR`` (for error messages)."""
        return f"{self.stage}{':' + self.mode if self.mode else ''}={self.folder}"


def parse_stage_spec(arg: str) -> StageSpec:
    """``STAGE=DIR`` or ``STAGE:MODE=DIR`` (MODE: logprob, likelihood or generate)."""
    name, sep, folder = arg.partition("=")
    if not sep or not name or not folder:
        raise SfmError(f"stage {arg!r}: expected STAGE=DIR (e.g. base=reports/base or base:likelihood=reports/base)")
    stage, _, mode = name.partition(":")
    if not stage:
        raise SfmError(f"stage {arg!r}: the stage name before '=' is empty")
    if mode and mode not in MODES:
        raise SfmError(f"stage {arg!r}: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return StageSpec(stage, Path(folder), mode or None)


def _as_specs(stages) -> list[StageSpec]:
    if isinstance(stages, Mapping):
        stages = list(stages.items())
    specs = []
    for s in stages:
        if isinstance(s, StageSpec):
            specs.append(s)
        elif isinstance(s, str):
            specs.append(parse_stage_spec(s))
        else:
            specs.append(StageSpec(str(s[0]), Path(s[1]), s[2] if len(s) > 2 else None))
    if not specs:
        raise SfmError("no stages to compare; pass STAGE=DIR for each (e.g. base=DIR sft=DIR dpo=DIR)")
    names = [s.stage for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SfmError(f"stage {dupes[0]!r} is given twice; each stage needs its own name")
    return specs


def _read_report(spec: StageSpec) -> dict[str, Any]:
    where = spec.text
    if not spec.folder.is_dir():
        raise SfmError(f"{where}: not found or not a folder; pass the --out folder of an 'sfm eval propensity' run")
    path = spec.folder / RESULTS_JSON
    if not path.is_file():
        raise SfmError(f"{where}: not an sfm eval report (no {RESULTS_JSON}); pass the --out folder of an "
                       "'sfm eval propensity' run")
    from megatron_sfm.utils.readers import read_json

    data = read_json(path, expect=None)
    if not isinstance(data, dict) or data.get("kind") != "sfm-eval":
        kind = data.get("kind") if isinstance(data, dict) else None
        raise SfmError(f"{where}: not an sfm eval report ({path.name} has kind {kind!r}, not 'sfm-eval')")
    if not any(data.get(s) for s in PROPENSITY_SECTIONS):
        raise SfmError(f"{where}: an sfm eval report without propensity results; run 'sfm eval propensity' into it")
    for section in PROPENSITY_SECTIONS:
        value = data.get(section)
        if value and not (isinstance(value, dict) and isinstance(value.get("mode"), str)
                          and isinstance(value.get("models"), dict)):
            raise SfmError(f"{where}: {path.name}: {section}: not a propensity section (no mode or models)")
    return data


def _pick_section(spec: StageSpec, data: dict[str, Any]) -> dict[str, Any]:
    where = spec.text
    present = [data[s]["mode"] for s in PROPENSITY_SECTIONS if data.get(s)]
    if spec.mode is None:
        return data["propensity"] if data.get("propensity") else data["propensity_likelihood"]
    prop = data.get(section_for_mode(spec.mode))
    if not prop or prop.get("mode") != spec.mode:
        raise SfmError(f"{where}: no {spec.mode}-mode results (it holds: {', '.join(present)})")
    return prop


def _pick_persona(spec: StageSpec, prop: dict[str, Any], persona: str | None) -> str:
    where = spec.text
    personas = section_personas(prop)
    mode = prop["mode"]
    if mode == "generate":
        if persona is not None:
            if persona not in personas:
                raise SfmError(f"{where}: generate-mode report has no persona {persona!r} (it holds: "
                               f"{', '.join(personas)}); run 'sfm eval propensity --mode generate --persona "
                               f"{persona}' for it")
            return persona
        if len(personas) != 1:
            raise SfmError(f"{where}: generate-mode report holds personas {', '.join(personas)}; "
                           "pick one with --persona")
        return personas[0]
    # base models: the persona they were measured with (normally the mode's default, "ai")
    if len(personas) == 1:
        return personas[0]
    for p in (persona, DEFAULT_PERSONA.get(mode)):
        if p in personas:
            return p
    raise SfmError(f"{where}: {mode}-mode report holds personas {', '.join(personas)}; pick one with --persona")


def _checksums_of(spec: StageSpec, prop: dict[str, Any], label: str) -> bool | None:
    """The model entry's ``checksums_verified``: True/False as recorded (for an ``sfm
    posttrain`` output, its chain's export's), None (unknown) when null or absent (a Hugging
    Face folder with nothing recorded, or a report written before the field existed)."""
    from megatron_sfm.utils.readers import optional_bool

    return optional_bool(prop["models"][label].get("checksums_verified"),
                         f"{spec.text}: {RESULTS_JSON}: {section_for_mode(prop['mode'])}: models[{label!r}]: "
                         "checksums_verified")


def load_stage(spec: StageSpec, persona: str | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read one stage folder: (stage metadata, condition label -> run), for the persona
    :func:`compare_stages` describes; each run also holds its model's ``checksums_verified``
    (None: unknown). Raises :class:`SfmError` (one line) for a folder that is not an eval
    report or lacks the mode or persona asked for."""
    data = _read_report(spec)
    prop = _pick_section(spec, data)
    chosen = _pick_persona(spec, prop, persona)
    runs = {label: {**run, "checksums_verified": _checksums_of(spec, prop, label)}
            for label, _, run in iter_runs(prop, chosen)}
    meta = {
        "dir": str(spec.folder),
        "section": section_for_mode(prop["mode"]),
        "mode": prop["mode"],
        "protocol": prop.get("protocol"),
        "persona": chosen,
        "order": prop.get("order"),
        "formats": list(prop.get("formats", [])),
        "questions_file": prop.get("questions_file"),
        "n_questions": prop.get("n_questions"),
    }
    if prop["mode"] == "likelihood":
        meta["normalize"] = prop.get("normalize")
    return meta, runs


def compare_stages(stages, *, persona: str | None = None) -> dict[str, Any]:
    """The comparison report (the document :func:`write_comparison` writes as results.json).

    ``stages``: in column order, any of ``"STAGE=DIR"`` / ``"STAGE:MODE=DIR"`` strings,
    :class:`StageSpec`, ``(stage, dir[, mode])`` tuples, or a mapping stage -> dir. Each
    dir is an ``sfm eval propensity`` output folder with one model per condition.
    ``persona``: the persona of the generate-mode stages (required when such a folder
    holds several; must be present in every generate-mode folder); log-prob and
    likelihood stages keep the persona they were run with.

    Returns ``{"kind": "sfm-eval-compare", "version": 1, "persona", "stages": {stage: meta},
    "checksums": {"verified", "not_verified", "unknown"}, "conditions": {label: {stage:
    {"path", "checksums_verified", "non_match_rate", "excluded", "splits"}}}, "notes"}``;
    ``splits`` are the source report's cells, unchanged. ``checksums.verified`` is True
    when every input model's checksums were verified, False when any was not, else None
    (some unknown); the two lists name the inputs (stage, condition, path) not verified
    and unknown.
    """
    specs = _as_specs(stages)
    if persona is not None:
        persona_text(persona)  # validates
    loaded = [(spec, *load_stage(spec, persona)) for spec in specs]
    conditions: list[str] = []
    for _, _, runs in loaded:
        conditions += [c for c in runs if c not in conditions]
    for spec, _, runs in loaded:
        for c in conditions:
            if c not in runs:
                raise SfmError(f"condition {c!r} is missing from stage {spec.stage} ({spec.folder} holds: "
                               f"{', '.join(runs) or 'no models'}); every stage needs one model per condition, "
                               "labelled alike")
    stages_meta = {spec.stage: meta for spec, meta, _ in loaded}
    notes = []
    asked = {(m["questions_file"], m["n_questions"]) for m in stages_meta.values()}
    if len(asked) > 1:
        notes.append("The stages were evaluated on different questions (" + "; ".join(
            f"{s}: {m['n_questions']} from {m['questions_file']}" for s, m in stages_meta.items()) + ").")
    modes = {m["mode"] for m in stages_meta.values()}
    if len(modes) > 1:
        notes.append("Stages measured in different modes (" + ", ".join(
            f"{s}: {m['mode']}" for s, m in stages_meta.items()) + ") are different measurements of the "
            "same propensity: a base model scored by letter log-probabilities, a chat model by the letter it writes.")
    return {
        "kind": COMPARE_KIND,
        "version": 1,
        "persona": persona,
        "stages": stages_meta,
        "checksums": _checksums_summary(loaded, conditions),
        "conditions": {
            c: {spec.stage: {"path": runs[c].get("path"), "checksums_verified": runs[c]["checksums_verified"],
                             "non_match_rate": runs[c].get("non_match_rate"),
                             "excluded": bool(runs[c].get("excluded")), "splits": runs[c]["splits"]}
                for spec, _, runs in loaded}
            for c in conditions
        },
        "notes": notes,
    }


def _checksums_summary(loaded, conditions: list[str]) -> dict[str, Any]:
    not_verified, unknown = [], []
    for spec, _, runs in loaded:
        for c in conditions:
            verified = runs[c]["checksums_verified"]
            if verified is not True:
                (unknown if verified is None else not_verified).append(
                    {"stage": spec.stage, "condition": c, "path": runs[c].get("path")})
    return {"verified": False if not_verified else None if unknown else True,
            "not_verified": not_verified, "unknown": unknown}


def checksums_lines(report: dict[str, Any]) -> list[str]:
    """The results.md lines on the inputs' checksums (a report without ``checksums``, written
    before it existed, gets none)."""
    summary = report.get("checksums")
    if not summary:
        return []
    total = sum(len(per_stage) for per_stage in report["conditions"].values())

    def names(inputs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{i['stage']}/{i['condition']} (`{i['path']}`)" for i in inputs)

    lines = []
    if summary["not_verified"]:
        lines += [(f"**Checksums not verified** for {len(summary['not_verified'])} of {total} input models: "
                   f"{names(summary['not_verified'])}. Their weights were read from a checkpoint without comparing "
                   "its files' content checksums with its manifest (`--no-verify-checksums` when evaluated or "
                   "exported, or a manifest with sizes only), so changed bytes would have gone unnoticed."), ""]
    if summary["unknown"]:
        lines += [(f"Checksum verification unknown for {len(summary['unknown'])} of {total} input models: "
                   f"{names(summary['unknown'])} (nothing recorded: a Hugging Face folder not written by "
                   "`sfm convert to-hf` or post-trained from one, or an export, post-training or report made "
                   "before verification was recorded)."), ""]
    if summary["verified"] is True:
        lines += [f"Checkpoint checksums verified for all {total} input models.", ""]
    return lines


# --- rendering ----------------------------------------------------------------------

def stage_heading(stage: str, meta: dict[str, Any]) -> str:
    """``"sft (generate, persona hhh)"``: a column's stage with its mode and persona."""
    return f"{stage} ({meta['mode']}, persona {meta['persona']})"


def _splits(report: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for per_stage in report["conditions"].values():
        for run in per_stage.values():
            seen += [s for s in run["splits"] if s not in seen]
    return seen


def render_comparison_markdown(report: dict[str, Any]) -> str:
    stages = report["stages"]
    lines = ["# Misalignment propensity across post-training stages", "",
             ("Misalignment rate in percent, mean ± standard error over each stage's prompt formats, per data "
              "condition, split and topic. Each column is one stage, read from its own `sfm eval propensity` "
              "report with the mode and persona in its heading. A run (model × persona) whose replies could not "
              "be read for 20% or more of its prompts (questions × formats) is excluded, as in the paper: shown "
              "as `excluded (…)`, never drawn."), "",
             "| stage | report | mode | persona | formats | questions |", "| --- | --- | --- | --- | --- | --- |"]
    for stage, m in stages.items():
        mode = MODE_NAMES.get(m["mode"], m["mode"])
        lines.append(f"| {stage} | `{m['dir']}` | {m['mode']}: {mode} | {m['persona']} | {len(m['formats'])} | "
                     f"{m['n_questions']} (`{m['questions_file']}`) |")
    lines.append("")
    lines += checksums_lines(report)
    for note in report.get("notes", []):
        lines += [f"Note: {note}", ""]
    headings = [stage_heading(s, m) for s, m in stages.items()]
    for split in _splits(report):
        lines += [f"## Split: {split}", ""]
        runs = [run for per_stage in report["conditions"].values() for run in per_stage.values()]
        if all((run["splits"].get(split) or {}).get("status", "empty") == "empty" for run in runs):
            lines += ["No questions in this split.", ""]
            continue
        lines += ["| condition | topic | " + " | ".join(headings) + " |", "| --- " * (2 + len(headings)) + "|"]
        for condition, per_stage in report["conditions"].items():
            for i, column in enumerate(split_columns(list(per_stage.values()), split)):
                cells = " | ".join(cell_text(per_stage[s], split, column) for s in stages)
                lines.append(f"| {condition if i == 0 else ''} | {column} | {cells} |")
        lines.append("")
    splits = _splits(report)
    lines += ["## Non-match rates", "",
              ("Share of prompts (questions × formats) without an answer: no letter could be read (generate "
               "mode) or the two scores tied (log-prob and likelihood modes)."), "",
              "| condition | stage | mode | persona | overall | " + "".join(f"{s} | " for s in splits) + "excluded |",
              "| --- " * (6 + len(splits)) + "|"]
    for condition, per_stage in report["conditions"].items():
        for stage, run in per_stage.items():
            m = stages[stage]
            per_split = "".join(f"{non_match_text(split_non_match(run, s))} | " for s in splits)
            lines.append(f"| {condition} | {stage} | {m['mode']} | {m['persona']} | "
                         f"{non_match_text(run.get('non_match_rate'))} | {per_split}"
                         f"{'yes (>= 20% non-match)' if run.get('excluded') else 'no'} |")
    lines += ["", "## Input models", "",
              ("Checksums: whether the model's weights were checked against its checkpoint's content checksums, "
               "as its stage report recorded it (`verified`, `not verified`, or `unknown` when nothing was "
               "recorded)."), "",
              "| condition | stage | path | checksums |", "| --- | --- | --- | --- |"]
    for condition, per_stage in report["conditions"].items():
        for stage, run in per_stage.items():
            lines.append(f"| {condition} | {stage} | `{run.get('path')}` | "
                         f"{CHECKSUMS_TEXT[run.get('checksums_verified')]} |")
    lines.append("")
    return "\n".join(lines)


def plot_comparison(report: dict[str, Any], path: str | os.PathLike) -> None:
    """One panel per condition (rows) and split (columns): bars per topic, one per stage
    (legend: stage, mode, persona), SE error bars; excluded runs marked, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(report["conditions"])
    splits = _splits(report) or ["all"]
    fig, axes = plt.subplots(len(conditions), len(splits), figsize=(7.0 * len(splits), 3.2 * len(conditions)),
                             squeeze=False)
    for r, condition in enumerate(conditions):
        per_stage = report["conditions"][condition]
        series = [(stage_heading(stage, report["stages"][stage]) + (" (excluded)" if run.get("excluded") else ""),
                   run) for stage, run in per_stage.items()]
        for c, split in enumerate(splits):
            ax = axes[r, c]
            drawn = draw_grouped_bars(ax, series, split)
            ax.set_title(f"{condition}: {split}" + ("" if drawn else " (no questions)"), fontsize=9)
    fig.suptitle("Misalignment rate by post-training stage, mean ± SE over formats", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * len(conditions))))  # room for the suptitle
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def print_comparison(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    stages = report["stages"]
    table = Table(title="Misalignment rate % by stage (all topics; mean ± SE over formats)")
    table.add_column("condition")
    table.add_column("split")
    for stage, m in stages.items():
        table.add_column(stage_heading(stage, m))
    for condition, per_stage in report["conditions"].items():
        for split in _splits(report):
            table.add_row(condition, split, *(cell_text(per_stage[s], split, "all") for s in stages))
    console = Console()
    console.print(table)
    unverified = (report.get("checksums") or {}).get("not_verified")
    if unverified:
        console.print("checksums not verified for: " + ", ".join(f"{i['stage']}/{i['condition']}" for i in unverified),
                      markup=False)


def _check_not_an_input(out: Path, report: dict[str, Any]) -> None:
    target = out.resolve()
    for stage, meta in report["stages"].items():
        src = Path(meta["dir"]).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise SfmError(f"--out {out}: overlaps the report folder of stage {stage} ({meta['dir']}); "
                           "pick a folder outside the stage folders")


def write_comparison(out: str | os.PathLike, report: dict[str, Any], *, overwrite: bool = False,
                     console: bool = False) -> dict[str, Path]:
    """Write ``report`` (from :func:`compare_stages`) to the folder ``out``: results.json,
    results.md, compare.png. The rule of every ``sfm eval`` output: ``out`` may be missing
    or empty; anything else is refused unless ``overwrite``, and then replaced atomically.
    ``out`` may not be (or hold, or lie inside) one of the stage folders. Returns
    ``{"json", "md", "png"}`` -> final paths."""
    out = Path(out)
    _check_not_an_input(out, report)
    with output_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / RESULTS_JSON, report)
        with atomic_path(tmp / RESULTS_MD) as md:
            md.write_text(render_comparison_markdown(report), encoding="utf-8")
        plot_comparison(report, tmp / COMPARE_PNG)
    if console:
        print_comparison(report)
    return {"json": out / RESULTS_JSON, "md": out / RESULTS_MD, "png": out / COMPARE_PNG}


def run_compare(stages, out: str | os.PathLike, *, persona: str | None = None, overwrite: bool = False,
                console: bool = False) -> tuple[dict[str, Any], dict[str, Path]]:
    """:func:`compare_stages` then :func:`write_comparison`; ``out`` is checked first, so a
    refused output folder costs no reading. Returns (report, written paths)."""
    check_output_dir(out, overwrite=overwrite)
    report = compare_stages(stages, persona=persona)
    return report, write_comparison(out, report, overwrite=overwrite, console=console)
