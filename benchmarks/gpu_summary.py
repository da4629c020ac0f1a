"""Merge the stages of benchmarks/gpu_check.sh into gpu_check.json and summary.md.

Reads the stage table (name, status, exit code, seconds, note), the stage logs in the
work folder and the JSON reports in the output folder; writes ``gpu_check.json`` (all of
it) and ``summary.md`` (tables ready for docs/benchmarks), and prints the summary.
Exit status: 0 when every stage that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

BENCH_FILES = {"bench_1p4b": "bench_1p4b.json", "bench_6p9b": "bench_6p9b.json",
               "bench_6p9b_fp8": "bench_6p9b_fp8.json"}


def read_stages(path: Path) -> list[dict]:
    stages = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, status, rc, seconds, note = (line.split("\t") + [""] * 5)[:5]
        stages.append({"name": name, "status": status, "exit_code": None if rc == "-" else int(rc),
                       "seconds": int(seconds or 0), "note": note})
    return stages


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def log_text(work: Path, stage: str) -> str:
    try:
        return (work / f"{stage}.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def env_facts(text: str) -> dict:
    facts = {}
    for line in text.splitlines():
        if line.startswith("ENV_JSON "):
            facts = json.loads(line[len("ENV_JSON "):])
    smi = [ln for ln in text.splitlines() if not ln.startswith("ENV_JSON ")]
    facts["nvidia_smi"] = "\n".join(smi[:40])
    return facts


def pytest_counts(text: str) -> dict:
    """Counts from pytest's last summary line ("3 failed, 40 passed, 2 skipped in 12.3s")."""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped)\b", ln)
             and re.search(r"\bin [0-9.]+s", ln)]
    if not lines:
        return {"summary": None}
    last = lines[-1].strip("= ")
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last)}
    counts["summary"] = last
    return counts


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _shape_name(report_or_path) -> str:
    text = str(report_or_path)
    if "1.4b" in text:
        return "Pythia-1.4B shape"
    if "6.9b" in text:
        return "6.9B shape, 4 layers"
    return os.path.basename(text)


def shape_table(bench: dict | None, hf_rows: list[dict]) -> list[str]:
    """Markdown rows: sfm bench rows, then the HF rows, ratios against HF amp."""
    reference = next((r for r in hf_rows if r.get("mode") == "amp" and r.get("status") == "ok"), None)
    ref_tps = reference["tokens_per_s_per_gpu"] if reference else None
    out = [("| implementation | params / main params | tokens/s/GPU | vs HF amp | TFLOP/s/GPU | MFU (table) "
            "| MFU (measured peak) | peak GiB | fwd / bwd / opt ms |"),
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def add(name, prec, row, mfu_measured):
        if row.get("status") != "ok":
            out.append(f"| {name} | {prec} | error: {str(row.get('error'))[:80]} | | | | | | |")
            return
        tps = row["tokens_per_s_per_gpu"]
        split = row["time_split_s"]
        mem = row["memory"].get("peak_allocated_gib")
        ratio = tps / ref_tps if ref_tps else None
        out.append(f"| {name} | {prec} | {tps:,.0f} | {_f(ratio, '.2f')} | {row['tflops_per_gpu']:.1f} | "
                   f"{row['mfu'] * 100:.1f}% | {_f(None if mfu_measured is None else mfu_measured * 100, '.1f')}"
                   f"{'%' if mfu_measured is not None else ''} | {_f(mem, '.1f')} | "
                   f"{split['forward'] * 1000:.0f} / {split['backward'] * 1000:.0f} / {split['optimizer'] * 1000:.0f} |")

    for row in (bench or {}).get("rows", []):
        prec = f"{row.get('precision')} / {row.get('main_params_dtype', '?')}"
        if row.get("fp8"):
            prec += f", fp8 ({row['fp8']})"
        add(f"Megatron-Core, {row['label']}", prec, row, row.get("mfu_measured"))
    for row in hf_rows:
        prec = "fp32 / fp32, bf16 autocast" if row.get("mode") == "amp" else "bf16 / bf16"
        add(f"HF GPTNeoX sdpa, {row.get('mode')}", prec, row, None)
    return out


def kernel_lines(report: dict | None) -> list[str]:
    """A short table of benchmarks/bench_kernels.py's timings (its fields read defensively)."""
    if not isinstance(report, dict):
        return []
    out = ["", "## Kernels (benchmarks/bench_kernels.py)",
           (f"correctness ok: {report.get('correctness_ok')}; targets met: {report.get('targets_met')}; "
            f"errors: {len(report.get('errors') or [])}"), "",
           "| kernel | shape | dtype | fused ms | reference ms | speedup |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for kind in ("attention", "cross_entropy"):
        for case in report.get(kind) or []:
            if not isinstance(case, dict):
                continue
            fused = case.get("fused") or {}
            ref_name = next((k for k in case if isinstance(case[k], dict) and k not in ("fused", "shape")), None)
            ref = case.get(ref_name) or {}
            key = "fwd_bwd_ms"
            speed = case.get("speedup_fwd_bwd", case.get("speedup"))
            shape = " ".join(f"{k}{v}" for k, v in (case.get("shape") or {}).items())
            out.append(f"| {kind} fwd+bwd vs {ref_name} | {shape} | {case.get('dtype')} | {_f(fused.get(key), '.3f')} | "
                       f"{_f(ref.get(key), '.3f')} | {_f(speed, '.2f')} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="gpu")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    stages = read_stages(Path(args.stages))
    env = env_facts(log_text(work, "env"))
    problems = []
    benches = {}
    for stage, name in BENCH_FILES.items():
        report = read_json(out / name)
        benches[stage] = report
        if report is not None:
            try:
                from megatron_sfm.benchmark.report import check_report

                problems += [f"{name}: {p}" for p in check_report(report)]
            except ImportError as exc:
                problems.append(f"{name}: schema not checked ({exc})")
    hf = read_json(out / "hf_baseline.json")
    kernels_json = read_json(out / "bench_kernels.json")
    kernel_tests = pytest_counts(log_text(work, "kernel_tests"))
    result = {
        "schema": "sfm-gpu-check/1",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": args.mode,
        "stages": stages,
        "env": env,
        "kernel_tests": kernel_tests,
        "bench_kernels": kernels_json if kernels_json is not None else {
            "log_tail": log_text(work, "bench_kernels").splitlines()[-60:]},
        "bench": benches,
        "hf_baseline": hf,
        "problems": problems,
    }

    lines = [f"# GPU check ({args.mode}), {result['created']}", ""]
    device = env.get("device") or "no GPU"
    lines.append(f"Device: {device}; torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, triton "
                 f"{env.get('triton')}, transformers {env.get('transformers')}, megatron-core "
                 f"{env.get('megatron.core')}, Python {env.get('python')}.")
    lines += ["", "| stage | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for s in stages:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['note'].replace('|', '/')[:120]} |")
    if kernel_tests.get("summary"):
        lines += ["", f"Kernel tests: {kernel_tests['summary']}"]
    lines += kernel_lines(kernels_json)
    for stage, report in benches.items():
        config_hint = report.get("config") if report else BENCH_FILES[stage]
        title = _shape_name(config_hint or stage)
        hf_rows = [r for r in (hf or {}).get("rows", []) if _shape_name(r.get("config", "")) == title]
        lines += ["", f"## {title}" + (", FP8 (torchao float8 vs bf16)" if stage.endswith("_fp8") else "")]
        if report is not None:
            peak = (report.get("peak") or {}).get("measured_tflops")
            lines.append(f"{report['steps']} timed steps after {report['warmup']} warm-up; micro-batch "
                         f"{report['rows'][0]['micro_batch_size'] if report['rows'] else '?'}, sequence "
                         f"{report['model']['seq_length']}; measured matmul peak: {peak} TFLOP/s; FLOPs: "
                         f"{report['flop_formula']}.")
        elif not hf_rows:
            lines.append("no results")
            continue
        lines += [""] + shape_table(report, hf_rows)
    if problems:
        lines += ["", "Schema problems:"] + [f"- {p}" for p in problems]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(text)
    failed = [s for s in stages if s["status"] in ("failed", "timeout")]
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
