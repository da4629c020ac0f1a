"""``sfm model ...``: inspect model presets and configs."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sfm model", description="model presets and sizing")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="parameters, FLOPs per token and per-GPU memory of a model")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a model preset (tiny, pythia-70m ... pythia-6.9b)")
    src.add_argument("--config", help="a run config YAML")
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    s.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    s.add_argument("--dp", type=int, default=1, help="data-parallel size")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--tokens", type=float, default=None,
                   help="training tokens (e.g. 500e9): adds the run's FLOPs and GPU-hours")
    rate = s.add_mutually_exclusive_group()
    rate.add_argument("--tflops", type=float, default=None, help="sustained TFLOP/s per GPU for the cost")
    rate.add_argument("--bench", default=None,
                      help="an sfm bench JSON report: its fastest ok row's TFLOP/s per GPU for the cost")
    s.add_argument("--bench-row", default=None, help="the label of the report row to use instead of the fastest")
    s.add_argument("--bench-any-shape", action="store_true",
                   help="use the --bench row even if it was measured on another layer shape")
    s.add_argument("--gpus", type=int, default=None, help="GPUs of the run: adds the wall time")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    sub.add_parser("presets", help="list the model presets")
    args = parser.parse_args(argv)

    from megatron_sfm.config import PRESETS, load_config, validate_run_config

    if args.command == "presets":
        for name, fields in PRESETS.items():
            print(f"{name:12s} layers={fields['num_layers']:3d} hidden={fields['hidden_size']:5d} "
                  f"heads={fields['num_attention_heads']:3d}")
        return 0
    overrides = list(args.overrides)
    if args.preset:
        overrides.insert(0, f"model.preset={args.preset}")
    if args.tp is not None:
        overrides.append(f"parallel.tensor_model_parallel_size={args.tp}")
    if args.pp is not None:
        overrides.append(f"parallel.pipeline_model_parallel_size={args.pp}")
    cfg = load_config(args.config, overrides)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    validate_run_config(cfg)  # batch sizes do not matter for sizing

    from megatron_sfm.model.summary import summarize

    summary = summarize(cfg.model, cfg.parallel, args.dp)
    cost = _cost(args, summary.flops_per_token, cfg.model)
    if args.json:
        out = summary.to_dict()
        if cost is not None:
            out["cost"] = cost.to_dict()
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model summary (TP={tp}, PP={pp}, DP={args.dp})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{summary.parameters:,}")
    table.add_row("non-embedding parameters", f"{summary.non_embedding_parameters:,}")
    table.add_row("parameters per GPU (largest stage)", f"{summary.parameters_per_rank_max:,}")
    table.add_row("padded vocabulary", f"{summary.padded_vocab_size:,}")
    table.add_row("training FLOPs per token", f"{summary.flops_per_token:.4g}")
    for key, value in summary.memory_gib.items():
        table.add_row(f"memory per GPU: {key} (GiB)", f"{value:.2f}")
    if cost is not None:
        table.add_row("training tokens", f"{cost.tokens:.4g}")
        table.add_row("training FLOPs", f"{cost.total_flops:.4g}")
        table.add_row("TFLOP/s per GPU (assumed)", f"{cost.tflops_per_gpu:.1f}")
        table.add_row("GPU-hours", f"{cost.gpu_hours:,.0f}")
        if cost.wall_hours is not None:
            table.add_row(f"wall hours on {cost.gpus} GPUs", f"{cost.wall_hours:,.1f}")
    Console().print(table)
    print(f"FLOPs: {summary.flop_formula}")
    if cost is not None:
        print(f"throughput: {cost.throughput_source}")
    return 0


def _cost(args, flops_per_token: float, model):
    from megatron_sfm.errors import ConfigError
    from megatron_sfm.model.cost import Throughput, estimate, throughput_from_bench

    rate_given = args.tflops is not None or args.bench is not None
    if args.tokens is None:
        if rate_given or args.gpus is not None or args.bench_row is not None:
            raise ConfigError("--tokens: needed with --tflops, --bench, --bench-row or --gpus")
        return None
    if not rate_given:
        raise ConfigError("--tokens: give the throughput too (--tflops X or --bench REPORT.json)")
    if (args.bench_row is not None or args.bench_any_shape) and args.bench is None:
        raise ConfigError("--bench-row / --bench-any-shape: only with --bench")
    if args.bench is not None:
        throughput = throughput_from_bench(args.bench, args.bench_row,
                                           None if args.bench_any_shape else model)
    else:
        throughput = Throughput(args.tflops, "given (--tflops)")
    return estimate(flops_per_token, args.tokens, throughput, args.gpus)
