"""The evaluation report: results.json, results.md, propensity.png, console table.

One output folder holds one report. ``sfm eval propensity`` (``propensity`` for the
letter modes, ``propensity_likelihood`` for likelihood mode) and ``sfm eval
capabilities`` each write their own section of results.json and keep the other
sections if they are already there, then re-render results.md (and the chart when
propensity results are present: one panel per split and mode, and per persona when a
section holds several). A section holds one run per (model, persona)
(:func:`megatron_sfm.evaluation.propensity.iter_runs`); a run flagged ``excluded`` (generate
mode, >= 20% non-matches) is shown as excluded in every table and chart, never averaged
in or ranked. Every file is written atomically, and :func:`write_section` builds the whole
folder beside the old one and swaps it in: a section replaced with its answers folder, the
other sections and their answers folders carried over unchanged, never a half-written folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.evaluation.propensity import iter_runs, section_personas
from megatron_sfm.utils.io import atomic_path, output_dir, write_json

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CHART_PNG = "propensity.png"
# results.json sections holding propensity results, in report order, and their answers folders
PROPENSITY_SECTIONS = ("propensity", "propensity_likelihood")
ANSWERS_DIRS = {"propensity": "answers", "propensity_likelihood": "answers-likelihood"}
NOT_PAPER = "not the paper's protocol"


def _sections(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, results[name]) for name in PROPENSITY_SECTIONS if results.get(name)]


def _mode_title(prop: dict[str, Any]) -> str:
    if prop.get("mode") == "likelihood":
        return f"option likelihood, per {prop.get('normalize', 'token')} ({NOT_PAPER})"
    return {"logprob": "letter log-probabilities", "generate": "generated letters"}.get(prop["mode"], prop["mode"])


def _first_persona(prop: dict[str, Any]) -> str | None:
    personas = section_personas(prop)
    return personas[0] if personas else None


def ordering(prop: dict[str, Any], split: str, persona: str | None = None) -> list[tuple[str, float]]:
    """(label, misalignment rate) of the models with a rate on ``split``'s ``all`` cell, lowest first.

    ``persona``: whose runs (default: the section's first persona, the only one of a
    single-persona run). Excluded runs are left out.
    """
    rows = []
    for label, _, run in iter_runs(prop, persona or _first_persona(prop)):
        entry = run["splits"].get(split)
        if run.get("excluded"):
            continue
        if entry and entry["status"] == "ok" and entry["all"] and entry["all"]["mean"] is not None:
            rows.append((label, entry["all"]["mean"]))
    return sorted(rows, key=lambda r: r[1])


def ordering_text(prop: dict[str, Any], split: str, persona: str | None = None) -> str:
    """"a 0.0 < b 37.0 = c 37.0" (percent, lowest first); "" without models."""
    rows = ordering(prop, split, persona)
    out = ""
    for i, (label, rate) in enumerate(rows):
        if i:
            out += " = " if round(100 * rate, 1) == round(100 * rows[i - 1][1], 1) else " < "
        out += f"{label} {100 * rate:.1f}"
    return out


def pct(mean: float | None, stderr: float | None) -> str:
    """"45.0 ± 3.1" (percent); "n/a" without a value."""
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * stderr:.1f}" if stderr is not None else f"{100 * mean:.1f}"


def read_results(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / RESULTS_JSON
    if not path.is_file():
        return {"kind": "sfm-eval", "version": 1}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SfmError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); remove it or pick another --out") from None
    if not isinstance(data, dict) or data.get("kind") != "sfm-eval":
        raise SfmError(f"{path}: not an sfm eval report (key 'kind' != 'sfm-eval'); pick another --out")
    return data


def merge_section(out_dir: str | os.PathLike, section: str, value: dict[str, Any]) -> dict[str, Any]:
    """Read the report in ``out_dir``, replace/merge ``section`` and return the whole report.

    ``capabilities`` merges per model (evaluating a second model keeps the first);
    ``propensity`` is replaced as a whole.
    """
    return _merged(read_results(out_dir), section, value)


def _merged(data: dict[str, Any], section: str, value: dict[str, Any]) -> dict[str, Any]:
    if section == "capabilities" and isinstance(data.get("capabilities"), dict):
        merged = dict(data["capabilities"])
        merged.update(value)
        data["capabilities"] = merged
    else:
        data[section] = value
    return data


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "model"


def write_answers(out_dir: str | os.PathLike, answers: dict[str, Sequence], subdir: str = "answers") -> dict[str, Path]:
    """``out_dir/subdir/<label>.jsonl`` per model, one answer per line; returns label -> path."""
    written = {}
    for label, rows in answers.items():
        path = Path(out_dir) / subdir / f"{_safe_name(label)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(a.to_dict()) + "\n" for a in rows)
        written[label] = path
    return written


def write_report(out_dir: str | os.PathLike, results: dict[str, Any], answers: dict[str, Sequence] | None = None,
                 console: bool = True, answers_dir: str = "answers") -> dict[str, Path]:
    """Write results.json, results.md, the chart (if propensity present) and per-model answers.

    ``answers`` go to ``answers_dir`` (``answers-likelihood`` for likelihood mode).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / RESULTS_JSON, "md": out / RESULTS_MD}
    write_json(written["json"], results)
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(render_markdown(results), encoding="utf-8")
    if _sections(results):
        written["png"] = out / CHART_PNG
        plot_propensity([prop for _, prop in _sections(results)], written["png"])
    for label, path in write_answers(out, answers or {}, answers_dir).items():
        written[f"answers:{label}"] = path
    if console:
        print_console_table(results)
    return written


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` at ``dst`` (answers files are only ever replaced, never edited in
    place, so sharing the inode is safe), or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_answers(src: Path, dst: Path, replaced: str | None) -> None:
    """Copy every answers folder of the report in ``src`` into ``dst`` except ``replaced``."""
    for name in ANSWERS_DIRS.values():
        if name != replaced and (src / name).is_dir():
            shutil.copytree(src / name, dst / name, copy_function=_link_or_copy)


def write_section(out_dir: str | os.PathLike, section: str, value: dict[str, Any],
                  answers: dict[str, Sequence] | None = None, *, keep_report: bool = True,
                  console: bool = True) -> dict[str, Path]:
    """Put ``section`` (with its ``answers``, for a propensity section) into the report at
    ``out_dir``, atomically; returns what :func:`write_report` returns, under ``out_dir``.

    ``keep_report``: start from the report already at ``out_dir`` (its other sections and
    their answers folders are kept unchanged; this section and its answers folder are
    replaced, ``capabilities`` merged per model); otherwise start from an empty report.
    The new folder is built in a temporary sibling and swapped in
    (:func:`megatron_sfm.utils.io.output_dir`), so ``out_dir`` is always the complete old
    report or the complete new one; on an error it is left as it was.
    """
    out = Path(out_dir)
    base = read_results(out) if keep_report else {"kind": "sfm-eval", "version": 1}
    report = _merged(base, section, value)
    answers_dir = ANSWERS_DIRS.get(section)
    with output_dir(out, overwrite=True) as tmp:
        if keep_report:
            _carry_answers(out, tmp, answers_dir)
        written = write_report(tmp, report, answers, console=False, answers_dir=answers_dir or "answers")
    if console:
        print_console_table(report)
    return {key: out / path.relative_to(tmp) for key, path in written.items()}


def split_columns(runs: Sequence[dict[str, Any]], split: str) -> list[str]:
    """``all`` and the sorted topics any of ``runs`` has in ``split``."""
    topics: set[str] = set()
    for run in runs:
        topics.update((run["splits"].get(split) or {}).get("topics", {}))
    return ["all"] + sorted(topics)


def _split_columns(prop: dict[str, Any], split: str) -> list[str]:
    return split_columns([run for _, _, run in iter_runs(prop)], split)


def _splits(prop: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for _, _, run in iter_runs(prop):
        for s in run["splits"]:
            if s not in seen:
                seen.append(s)
    return seen


def excluded_text(text: str) -> str:
    """How an excluded run's value is shown: marked, never as a plain rate."""
    return f"excluded ({text})"


def cell_text(run: dict[str, Any], split: str, column: str) -> str:
    """A run's ``mean ± SE`` (percent) in ``split`` / ``column`` (``all`` or a topic), marked
    when the run is excluded; "no questions" for an empty split, "—" for a missing topic."""
    entry = run["splits"].get(split)
    if entry is None or entry["status"] == "empty":
        return "no questions"
    cell = entry["all"] if column == "all" else entry["topics"].get(column)
    if cell is None:
        return "—"
    text = pct(cell["mean"], cell["stderr"])
    return excluded_text(text) if run.get("excluded") else text



def non_match_text(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


CHECKSUMS_TEXT = {True: "verified", False: "not verified", None: "unknown"}  # a checksums_verified value in words


# where a model entry's checksums were not verified, by its checksums_source (None, from a
# report written before checksums_source existed: not named)
CHECKSUMS_NOT_VERIFIED_WHERE = {
    "eval": "by this evaluation (its --no-verify-checksums, or a manifest with sizes only)",
    "export": "when exported (sfm convert to-hf --no-verify-checksums, or a manifest with sizes only)",
    "posttrain": ("when the model its post-training started from was exported (sfm convert to-hf "
                  "--no-verify-checksums, or a manifest with sizes only; recorded in posttrain.json)"),
    None: "",
}
CHECKSUMS_UNKNOWN_WHY = {
    "export": "exported before sfm_export.json recorded them",
    "posttrain": ("post-trained from a folder with no checksum record, or before posttrain.json recorded "
                  "them"),
}


def unverified_note(entry: dict[str, Any]) -> str:
    """" (checksums not verified)" for weights loaded without hashing the checkpoint's files
    (on this load, when the ``sfm convert to-hf`` folder was exported, or when the source of
    an ``sfm posttrain`` output was), " (checksums unknown)" for an export or post-training
    output whose record is ``null``, else "" (verified, or a Hugging Face folder with
    nothing recorded)."""
    if "checksums_verified" not in entry or entry["checksums_verified"] is True:
        return ""
    return " (checksums not verified)" if entry["checksums_verified"] is False else " (checksums unknown)"


def split_non_match(run: dict[str, Any], split: str) -> float | None:
    """The non-match rate of a run in one split (its ``all`` cell); None for an empty split."""
    entry = run["splits"].get(split)
    if not entry or entry["status"] != "ok" or not entry["all"]:
        return None
    return entry["all"].get("non_match_rate")


def _render_propensity(prop: dict[str, Any], likelihood: bool) -> list[str]:
    if likelihood:
        lines = [
            f"## Misalignment propensity: option likelihood ({NOT_PAPER})",
            "",
            ("**Not the paper's protocol.** Each option's own text is scored as the continuation of the "
             "persona preamble and the scenario (the prompt does not list the options); the option with the "
             f"higher log-likelihood per {prop.get('normalize', 'token')} is the model's choice. Misalignment "
             f"rate in percent, mean ± standard error over {len(prop['formats'])} prompt variants (persona "
             f"`{prop['persona']}`, {prop['n_questions']} questions from `{prop['questions_file']}`, "
             f"{prop['device']} {prop['dtype']})."),
            "",
        ]
    else:
        personas = section_personas(prop)
        who = (f"persona `{personas[0]}`" if len(personas) == 1
               else "personas " + ", ".join(f"`{p}`" for p in personas) + ", one run per model and persona")
        lines = [
            "## Misalignment propensity",
            "",
            (f"Misalignment rate in percent, mean ± standard error over {len(prop['formats'])} formats "
             f"(mode `{prop['mode']}`, {who}, order `{prop['order']}`, "
             f"{prop['n_questions']} questions from `{prop['questions_file']}`, {prop['device']} {prop['dtype']})."),
            "",
        ]
        if prop.get("mode") == "generate":
            limit = 100 * prop.get("non_match_limit", 0.2)
            lines += [(f"A run (model × persona) whose replies are non-matches (no letter could be read) for "
                       f"{limit:.0f}% or more of its prompts (questions × formats) is excluded, as in the paper: "
                       "its rates are "
                       "shown as `excluded (…)`, left out of the orderings, and not drawn in the chart."), ""]
    personas = section_personas(prop)
    multi = len(personas) > 1
    runs = list(iter_runs(prop))
    for split in _splits(prop):
        cols = _split_columns(prop, split)
        lines += [f"### Split: {split}", ""]
        if all((run["splits"].get(split) or {}).get("status", "empty") == "empty" for _, _, run in runs):
            lines += ["No questions in this split.", ""]
            continue
        n = next(run["splits"][split]["n_questions"] for _, _, run in runs
                 if (run["splits"].get(split) or {}).get("status") == "ok")
        lines += [f"{n} questions.", ""]
        lines.append("| model | " + ("persona | " if multi else "") + " | ".join(cols) + " |")
        lines.append("| --- " * (len(cols) + 1 + multi) + "|")
        for p in personas:
            for label, _, run in iter_runs(prop, p):
                lines.append(f"| {label} | " + (f"{p} | " if multi else "") +
                             " | ".join(cell_text(run, split, c) for c in cols) + " |")
        lines.append("")
        if len(prop["models"]) > 1:
            for p in personas:
                if ordering(prop, split, p):
                    where = f" (persona `{p}`)" if multi else ""
                    lines += [f"Ordering on `all`{where}, least to most misaligned: {ordering_text(prop, split, p)}.",
                              ""]
    splits = _splits(prop)
    lines += ["### Runs" + (" (likelihood mode)" if likelihood else ""), "",
              "| model | persona | path | non-match rate | " + "".join(f"non-match {s} | " for s in splits)
              + "excluded |",
              "| --- " * (5 + len(splits)) + "|"]
    for label, p, run in runs:
        per_split = "".join(f"{non_match_text(split_non_match(run, s))} | " for s in splits)
        path = f"`{run['path']}`{unverified_note(prop['models'][label])}"
        lines.append(f"| {label} | {p} | {path} | {non_match_text(run.get('non_match_rate'))} | {per_split}"
                     f"{'yes (>= 20% non-match)' if run.get('excluded') else 'no'} |")
    lines.append("")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# Evaluation report", ""]
    demo = results.get("demo")
    if isinstance(demo, dict) and demo.get("summary"):
        lines += ["## What the demo finds", ""] + [f"- {line}" for line in demo["summary"]] + [""]
    sections = _sections(results)
    for name, prop in sections:
        lines += _render_propensity(prop, likelihood=name == "propensity_likelihood")
    prop = bool(sections)
    caps = results.get("capabilities")
    if caps:
        lines += ["## Capabilities (lm-evaluation-harness)", "", "| model | task | metric | value | stderr |",
                  "| --- | --- | --- | --- | --- |"]
        for label, entry in caps.items():
            for task, metrics in entry["tasks"].items():
                for metric, v in metrics.items():
                    if metric.endswith("_stderr"):
                        continue
                    se = metrics.get(f"{metric}_stderr")
                    se_text = f"{se:.4f}" if isinstance(se, (int, float)) else "n/a"
                    val = f"{v:.4f}" if isinstance(v, (int, float)) else str(v)
                    lines.append(f"| {label} | {task} | {metric} | {val} | {se_text} |")
        lines.append("")
        lines += _checksums_notes(caps)
    if not prop and not caps:
        lines += ["No results.", ""]
    return "\n".join(lines)


def _checksums_notes(caps: dict[str, Any]) -> list[str]:
    """Lines naming the capabilities models whose checksums were not verified, or are
    unknown, grouped by where that was decided (``checksums_source``)."""
    not_verified: dict[str, list[str]] = {}
    unknown: dict[str, list[str]] = {}
    for label, entry in caps.items():
        if not unverified_note(entry):  # verified, or nothing recorded
            continue
        source = entry.get("checksums_source")
        if entry["checksums_verified"] is False:
            not_verified.setdefault(CHECKSUMS_NOT_VERIFIED_WHERE.get(source, ""), []).append(label)
        else:
            unknown.setdefault(CHECKSUMS_UNKNOWN_WHY.get(source or "export", "nothing recorded"), []).append(label)
    lines = []
    for where, labels in not_verified.items():
        lines += [f"Checkpoint checksums not verified{' ' + where if where else ''} for: {', '.join(labels)}.", ""]
    for why, labels in unknown.items():
        lines += [f"Checkpoint checksums unknown ({why}) for: {', '.join(labels)}.", ""]
    return lines


def plot_propensity(props: dict[str, Any] | Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Figure-2-style chart: one panel per split (and per mode when ``props`` lists several
    sections: letter modes, then likelihood; and per persona when a section holds several),
    grouped bars (models) per topic, SE error bars; excluded runs marked, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    props = [props] if isinstance(props, dict) else list(props)
    panels = [(prop, persona, split) for prop in props for persona in section_personas(prop)
              for split in _splits(prop)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 * 8), 3.2 * len(panels)), squeeze=False)
    for ax, (prop, persona, split) in zip(axes[:, 0], panels):
        series = [(label + (" (excluded)" if run.get("excluded") else ""), run)
                  for label, _, run in iter_runs(prop, persona)]
        empty = not draw_grouped_bars(ax, series, split)
        where = f", persona {persona}" if len(section_personas(prop)) > 1 else ""
        ax.set_title(f"{split}: {_mode_title(prop)}{where}" + (" (no questions)" if empty else ""), fontsize=9)
    modes = ", ".join(f"{p['mode']}, persona {p['persona']}" for p in props)
    fig.suptitle(f"Misalignment propensity ({modes}), mean ± SE over formats", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * len(panels))))  # room for the suptitle
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def draw_grouped_bars(ax, series: Sequence[tuple[str, dict[str, Any]]], split: str) -> bool:
    """One bar group per column (``all`` + topics of ``split``), one bar per ``(legend label,
    run)`` in ``series``, SE error bars, a 50% line. An excluded run gets no bars: "excluded"
    is written where they would stand. Returns False when no run has questions in ``split``.
    """
    cols = split_columns([run for _, run in series], split)
    width = 0.8 / max(1, len(series))
    drawn = False
    for k, (label, run) in enumerate(series):
        entry = run["splits"].get(split)
        if entry is None or entry["status"] == "empty":
            continue
        drawn = True
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(cols))]
        if run.get("excluded"):
            ax.bar(xs, [0.0] * len(cols), width, label=label, color="none", edgecolor="grey", hatch="//")
            for x in xs:
                ax.text(x, 2, "excluded", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
            continue
        means, errs = [], []
        for x, c in zip(xs, cols):
            cell = entry["all"] if c == "all" else entry["topics"].get(c)
            means.append(100 * cell["mean"] if cell and cell["mean"] is not None else 0.0)
            errs.append(100 * cell["stderr"] if cell and cell["stderr"] is not None else 0.0)
            if cell and cell["mean"] is None:  # nothing answered: no rate, not a 0% bar
                ax.text(x, 2, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=label, color=f"C{k % 10}")  # a series keeps its colour
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("misalignment rate (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", linewidth=0.5, linestyle="--")
    if drawn:
        ax.legend(fontsize=7, loc="upper right")
    return drawn


def print_console_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, prop in _sections(results):
        what = _mode_title(prop) if name == "propensity_likelihood" else prop["mode"]
        table = Table(title=f"Misalignment rate % ({what}; mean ± SE over {len(prop['formats'])} formats)")
        table.add_column("model")
        table.add_column("persona")
        table.add_column("split")
        table.add_column("all")
        table.add_column("non-match")
        for label, persona, run in iter_runs(prop):
            for split in _splits(prop):
                table.add_row(label + (" (excluded)" if run.get("excluded") else ""), persona or "", split,
                              cell_text(run, split, "all"), non_match_text(split_non_match(run, split)))
        console.print(table)
    caps = results.get("capabilities")
    if caps:
        table = Table(title="Capabilities (lm-evaluation-harness)")
        for c in ("model", "task", "metric", "value"):
            table.add_column(c)
        for label, entry in caps.items():
            for task, metrics in entry["tasks"].items():
                for metric, v in metrics.items():
                    if not metric.endswith("_stderr"):
                        table.add_row(label, task, metric, f"{v:.4f}" if isinstance(v, (int, float)) else str(v))
        console.print(table)
