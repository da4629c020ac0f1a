"""Hugging Face GPTNeoXForCausalLM trained on the same shapes as ``sfm bench``, for ratios.

The baseline a user has without this project: transformers' GPT-NeoX with SDPA attention,
torch AdamW (fused on CUDA), gradient clipping at the config's ``optimizer.clip_grad``,
random tokens generated on the device, the config's micro-batch and global batch
(gradient accumulation). Modes:

* ``amp``  fp32 parameters and optimizer state, bf16 autocast (the HF Trainer's bf16 mode);
* ``bf16`` bf16 parameters, gradients and optimizer state.

The shape comes from our run config (``GPTNeoXAdapter.hf_config`` in ``megatron_sfm.conversion.gpt_neox``),
TFLOP/s and MFU from ``megatron_sfm.metrics.step_metrics`` (Megatron-LM's formula), so
the numbers compare one to one with ``sfm bench`` rows. Timing: warm-up steps excluded;
forward (to the loss) / backward / optimizer (clip, step, zero_grad) with CUDA events.

    python benchmarks/bench_hf_baseline.py examples/configs/bench-pythia-1.4b.yaml \\
        examples/configs/bench-pythia-6.9b-4l.yaml --modes amp,bf16 --json hf.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

SCHEMA = "sfm-hf-baseline/1"
MODES = {"amp": "fp32 params + bf16 autocast", "bf16": "bf16 params and optimizer state"}


def build_model(model_cfg, mode: str, device: torch.device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

    config = GPTNeoXConfig(**GPTNeoXAdapter.hf_config(model_cfg, model_cfg.padded_vocab(), "fp32"))
    config._attn_implementation = "sdpa"
    config.use_cache = False
    with torch.device(device):
        model = GPTNeoXForCausalLM(config)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    return model


class Marks:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


def measure(cfg, mode: str, steps: int, warmup: int, device: torch.device) -> dict:
    """Train ``warmup + steps`` steps; the timed steps' times, memory and last loss."""
    cuda = device.type == "cuda"
    m, t = cfg.model, cfg.training
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(t.seed)
    model = build_model(m, mode, device)
    kwargs = {"lr": 1e-4, "betas": (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2),
              "eps": cfg.optimizer.adam_eps, "weight_decay": cfg.optimizer.weight_decay}
    if cuda:
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(model.parameters(), **kwargs)
    n_micro = t.global_batch_size // t.micro_batch_size
    generator = torch.Generator(device=device)
    generator.manual_seed(t.seed)
    pool = [torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length), generator=generator, device=device)
            for _ in range(min(2, n_micro))]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mode == "amp"
                else torch.autocast(device.type, enabled=False))
    clock = Marks(cuda)
    rows, loss_value = [], float("nan")
    try:
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            wall0 = time.perf_counter()
            start = clock.mark()
            forward = 0.0
            pairs = []
            total_loss = torch.zeros((), device=device)
            for k in range(n_micro):
                ids = pool[k % len(pool)]
                f0 = clock.mark()
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss / n_micro
                f1 = clock.mark()
                pairs.append((f0, f1))
                loss.backward()
                total_loss += loss.detach().float()
            fb_end = clock.mark()
            if cfg.optimizer.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = clock.mark()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - wall0
            forward = sum(clock.seconds(a, b) for a, b in pairs)
            fb = clock.seconds(start, fb_end)
            opt = clock.seconds(fb_end, end)
            loss_value = float(total_loss)
            if i >= warmup:
                rows.append((wall, forward, max(0.0, fb - forward), opt))
        memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}
        return {"steps": rows, "memory": memory, "loss": loss_value,
                "parameters": sum(p.numel() for p in model.parameters())}
    finally:
        del model, optimizer, pool
        if cuda:
            torch.cuda.empty_cache()


def row_for(config_path: str, cfg, mode: str, result: dict) -> dict:
    from megatron_sfm.metrics import step_metrics

    m, t = cfg.model, cfg.training
    steps = result["steps"]
    wall = [s[0] for s in steps]
    mean = statistics.fmean(wall)
    metrics = step_metrics(m, t.global_batch_size, m.seq_length, mean, 1, precision="bf16",
                           peak=cfg.logging.peak_tflops)
    return {
        "label": f"hf-gptneox sdpa {mode} ({MODES[mode]})", "config": config_path, "mode": mode, "status": "ok",
        "error": None, "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
        "seq_length": m.seq_length, "parameters": result["parameters"],
        "step_time_s": {"mean": mean, "median": statistics.median(wall), "min": min(wall), "max": max(wall)},
        "tokens_per_s_per_gpu": metrics.tokens_per_s, "tflops_per_gpu": metrics.tflops_per_gpu,
        "mfu": metrics.mfu, "peak_tflops_table": metrics.peak_tflops,
        "time_split_s": {"forward": statistics.fmean(s[1] for s in steps),
                         "backward": statistics.fmean(s[2] for s in steps),
                         "optimizer": statistics.fmean(s[3] for s in steps)},
        "memory": result["memory"], "loss": result["loss"], "timed_steps": len(steps),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="sfm run configs (model and training sections are used)")
    parser.add_argument("--modes", default="amp", help="comma-separated: amp, bf16 (default amp)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every config (repeatable)")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    bad = [x for x in modes if x not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; known: {', '.join(MODES)}")

    from megatron_sfm.config import load_config
    from megatron_sfm.metrics import FLOP_FORMULA_NAME, gpu_name

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for path in args.configs:
        cfg = load_config(path, args.overrides)
        for mode in modes:
            label = f"{os.path.basename(path)} hf {mode}"
            print(f"{label}: building", file=sys.stderr, flush=True)
            try:
                row = row_for(path, cfg, mode, measure(cfg, mode, args.steps, args.warmup, device))
            except Exception as exc:  # noqa: BLE001 - an OOM on one row must not end the run
                row = {"label": f"hf-gptneox sdpa {mode} ({MODES[mode]})", "config": path, "mode": mode,
                       "status": "error", "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]}
            rows.append(row)
            if row["status"] == "ok":
                mem = row["memory"]["peak_allocated_gib"]
                print(f"{label}: {row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, {row['tflops_per_gpu']:.1f} "
                      f"TFLOP/s/GPU, MFU {row['mfu'] * 100:.1f}%, peak {mem if mem is None else round(mem, 2)} GiB, "
                      f"step {row['step_time_s']['mean'] * 1000:.1f} ms", flush=True)
            else:
                print(f"{label}: error: {row['error']}", flush=True)
    import transformers

    report = {
        "schema": SCHEMA, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "flop_formula": FLOP_FORMULA_NAME, "steps": args.steps,
        "warmup": args.warmup, "overrides": args.overrides,
        "device": {"type": device.type, "name": gpu_name() or platform.machine()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "rows": rows,
    }
    if args.json_out:
        from megatron_sfm.utils.io import write_json

        write_json(args.json_out, report)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
