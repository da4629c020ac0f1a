"""Check and time the Triton kernels (megatron_sfm.kernels) against the PyTorch paths they replace.

On a CUDA GPU (H100 for docs/benchmarks/kernels.md):
  1. correctness at real shapes, bf16, against an fp32 reference (rotary in PyTorch, then
     scaled_dot_product_attention in fp32; cross-entropy in float64): relative error
     (max |err| / max |ref|) under 1e-2 for outputs and gradients, 1e-4 for the fp32 losses;
  2. attention forward+backward, batch 4, 32 heads, head dim 128 (rotary 32), sequence
     2048 and 16384, bf16: fused kernel vs PyTorch rotary (Megatron's formula) followed by
     ``F.scaled_dot_product_attention`` (target: at least as fast);
  3. cross-entropy forward+backward at 8192 tokens x vocab 50432, bf16 logits, 4 sources
     with weights: fused vs ``F.cross_entropy`` (target: at least 1.5x).
Timings are medians of ``triton.testing.do_bench``. The JSON summary goes to stdout (and
``--json PATH``); the exit status is 1 when a correctness check fails or a stage raises.

    python benchmarks/bench_kernels.py [--json PATH] [--all-head-dims]
    python benchmarks/bench_kernels.py --smoke      # CPU: tiny shapes, Triton interpreter

Autotuning results are cached on disk (Triton's cache dir, ``TRITON_CACHE_DIR``), so a
second run skips the tuning and compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run under TRITON_INTERPRET=1 at tiny shapes")
    p.add_argument("--json", metavar="PATH", help="also write the JSON summary here (atomically)")
    p.add_argument("--all-head-dims", action="store_true",
                   help="also check head dims 64 and 256 (more kernels to compile)")
    p.add_argument("--seqs", default="2048,16384", help="attention timing sequence lengths (GPU)")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case (ms)")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_sfm.kernels.attention import (  # noqa: E402
    apply_rotary_reference,
    attention_reference,
    rotary_flash_attention,
    rotary_tables,
)
from megatron_sfm.kernels.cross_entropy import (  # noqa: E402
    cross_entropy_per_source_reference,
    fused_cross_entropy,
)

GPU = torch.cuda.is_available() and not ARGS.smoke
DEVICE = torch.device("cuda" if GPU else "cpu")
ATTN_TOL = 1e-2  # bf16 on the GPU
LOSS_TOL = 1e-4  # fp32 losses over a 50k vocabulary


def rel_err(actual, expected) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def bench_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn()."""
    if GPU:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=ARGS.rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []
    for _ in range(2):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------


def fused_qkv(s, b, h, d, dtype, seed=0):
    """A leaf [s, b, h, 3d] tensor and its q, k, v views: Megatron's layout after linear_qkv."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(s, b, h, 3 * d, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)
    qkv.requires_grad_(True)
    return qkv


def megatron_rotary(t, cos, sin):
    """Megatron-Core's non-interleaved rotary (rope_utils._apply_rotary_pos_emb_bshd): cos/sin in t's dtype."""
    rot_dim = 2 * cos.shape[-1]
    c = torch.cat([cos, cos], -1)[:, None, None, :].to(t.dtype)
    s_ = torch.cat([sin, sin], -1)[:, None, None, :].to(t.dtype)
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    return torch.cat([t_rot * c + torch.cat([-x2, x1], -1) * s_, t_pass], dim=-1)


def stock_attention(qkv, d, cos, sin):
    """PyTorch rotary, then SDPA (Megatron's q/k rotation + our sdpa backend): out [s, b, h*d]."""
    q, k, v = qkv.split(d, dim=-1)
    q, k = megatron_rotary(q, cos, sin), megatron_rotary(k, cos, sin)
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def fused_attention(qkv, d, cos, sin, block_sizes=None):
    q, k, v = qkv.split(d, dim=-1)
    out = rotary_flash_attention(q, k, v, rotary_dim=2 * cos.shape[-1], rotary_cos=cos, rotary_sin=sin,
                                 block_sizes=block_sizes)
    return out.view(out.shape[0], out.shape[1], -1)


def fp32_reference(qkv, d, cos, sin):
    """fp32 rotary (same tables) then fp32 attention; out and grads of qkv for upstream g."""
    x = qkv.detach().float().requires_grad_(True)
    q, k, v = x.split(d, dim=-1)
    q, k = apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin)
    if GPU:
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True)
        out = out.permute(2, 0, 1, 3)
    else:
        out = attention_reference(q.double(), k.double(), v.double(), rotary_dim=0).float()
    return x, out.reshape(out.shape[0], out.shape[1], -1)


# Head dims other than the timed 128 are checked with one fixed launch configuration
# instead of autotuning: fewer kernels to compile.
FIXED = {"fwd": (64, 64), "dkdv": (32, 64), "dq": (64, 64)}


def check_attention(s, b, h, d, rotary_dim, dtype) -> dict:
    qkv = fused_qkv(s, b, h, d, dtype, seed=s + d)
    cos, sin = rotary_tables(rotary_dim, 10000.0, s, DEVICE)
    cos, sin = cos[:s], sin[:s]
    out = fused_attention(qkv, d, cos, sin, block_sizes=FIXED if GPU and d != 128 else None)
    g = torch.randn(out.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1)).to(dtype)
    out.backward(g)
    x, ref = fp32_reference(qkv, d, cos, sin)
    ref.backward(g.float())
    tol = ATTN_TOL if dtype == torch.bfloat16 else {torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    errs = {"out": rel_err(out, ref)}
    for name, i in (("dq", 0), ("dk", 1), ("dv", 2)):
        errs[name] = rel_err(qkv.grad[..., i * d:(i + 1) * d], x.grad[..., i * d:(i + 1) * d])
    ok = all(e < tol for e in errs.values())  # NaN fails
    return {"shape": {"s": s, "b": b, "h": h, "d": d, "rotary_dim": rotary_dim}, "dtype": str(dtype).split(".")[-1],
            "tolerance": tol, "rel_err": errs, "ok": ok}


def time_attention(s, b, h, d, rotary_dim, dtype) -> dict:
    qkv = fused_qkv(s, b, h, d, dtype)
    cos, sin = rotary_tables(rotary_dim, 10000.0, s, DEVICE)
    cos, sin = cos[:s].contiguous(), sin[:s].contiguous()
    g = torch.randn(s, b, h * d, device=DEVICE, dtype=dtype)

    def run(fn, backward):
        def step():
            out = fn(qkv, d, cos, sin)
            if backward:
                out.backward(g)
        return step

    causal_fwd_flops = 2 * 2 * b * h * s * s * d / 2  # two matmuls, half the matrix
    result = {"shape": {"s": s, "b": b, "h": h, "d": d, "rotary_dim": rotary_dim}, "dtype": str(dtype).split(".")[-1],
              "flops_note": "causal: fwd 2*b*h*s^2*d, fwd+bwd 3.5x that"}
    for label, fn in (("fused", fused_attention), ("torch_rotary_sdpa", stock_attention)):
        with torch.no_grad():
            fwd = bench_ms(run(fn, False))
        fwd_bwd = bench_ms(run(fn, True), grad_to_none=[qkv])
        result[label] = {"fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fwd_bwd, 4),
                         "fwd_tflops": round(causal_fwd_flops / fwd / 1e9, 1),
                         "fwd_bwd_tflops": round(3.5 * causal_fwd_flops / fwd_bwd / 1e9, 1)}
    result["speedup_fwd_bwd"] = round(result["torch_rotary_sdpa"]["fwd_bwd_ms"] / result["fused"]["fwd_bwd_ms"], 3)
    result["speedup_fwd"] = round(result["torch_rotary_sdpa"]["fwd_ms"] / result["fused"]["fwd_ms"], 3)
    result["meets_target"] = result["speedup_fwd_bwd"] >= 1.0
    if GPU:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------
# cross-entropy
# ----------------------------------------------------------------------------------------


def ce_inputs(n, vocab, sources, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g, device=DEVICE)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g, device=DEVICE)
    labels[::17] = -100
    src = torch.randint(0, sources, (n,), generator=g, device=DEVICE)
    weights = torch.linspace(0.5, 2.0, sources, device=DEVICE)
    return logits, labels, src, weights


def check_cross_entropy(n, vocab, dtype) -> dict:
    sources = 4
    logits, labels, src, weights = ce_inputs(n, vocab, sources, dtype, seed=3)
    x = logits.clone().requires_grad_(True)
    loss, sums, counts = fused_cross_entropy(x, labels, src, sources, weights)
    upstream = torch.rand(n, device=DEVICE)
    loss.backward(upstream)
    xr = logits.detach().double().requires_grad_(True)
    ref_loss, ref_sums, ref_counts = cross_entropy_per_source_reference(xr, labels, src, sources, weights.double())
    ref_loss.backward(upstream.double())
    grad_tol = ATTN_TOL if dtype == torch.bfloat16 else {torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    errs = {"per_token_loss": rel_err(loss, ref_loss), "source_loss_sum": rel_err(sums, ref_sums),
            "grad": rel_err(x.grad, xr.grad)}
    ok = (errs["per_token_loss"] < LOSS_TOL and errs["source_loss_sum"] < LOSS_TOL and errs["grad"] < grad_tol
          and torch.equal(counts.cpu(), ref_counts.cpu()))
    return {"shape": {"n": n, "vocab": vocab, "sources": sources}, "dtype": str(dtype).split(".")[-1],
            "tolerance": {"loss": LOSS_TOL, "grad": grad_tol}, "rel_err": errs,
            "counts_equal": bool(torch.equal(counts.cpu(), ref_counts.cpu())), "ok": bool(ok)}


def time_cross_entropy(n, vocab, dtype) -> dict:
    sources = 4
    logits, labels, src, weights = ce_inputs(n, vocab, sources, dtype)
    x = logits.clone().requires_grad_(True)

    def fused():
        loss, _, counts = fused_cross_entropy(x, labels, src, sources, weights)
        (loss.sum() / counts.sum()).backward()

    def torch_ce():
        F.cross_entropy(x, labels, ignore_index=-100).backward()

    def torch_ce_fp32():  # Megatron-style: upcast, then cross-entropy
        F.cross_entropy(x.float(), labels, ignore_index=-100).backward()

    result = {"shape": {"n": n, "vocab": vocab, "sources": sources}, "dtype": str(dtype).split(".")[-1]}
    for label, fn in (("fused", fused), ("f_cross_entropy", torch_ce), ("f_cross_entropy_fp32", torch_ce_fp32)):
        result[label] = {"fwd_bwd_ms": round(bench_ms(fn, grad_to_none=[x]), 4)}
    result["speedup"] = round(result["f_cross_entropy"]["fwd_bwd_ms"] / result["fused"]["fwd_bwd_ms"], 3)
    result["speedup_vs_fp32"] = round(result["f_cross_entropy_fp32"]["fwd_bwd_ms"] / result["fused"]["fwd_bwd_ms"], 3)
    result["meets_target"] = result["speedup"] >= 1.5
    return result


# ----------------------------------------------------------------------------------------


def environment() -> dict:
    import triton

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__, "mode": "smoke" if ARGS.smoke else "gpu",
           "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))}
    if GPU:
        env["device"] = torch.cuda.get_device_name(0)
    return env


def main() -> int:
    if not GPU and not ARGS.smoke:
        print("bench_kernels: no CUDA GPU; use --smoke for the CPU run under the Triton interpreter", file=sys.stderr)
        return 2
    t_start = time.time()
    summary = {"environment": environment(), "correctness": [], "attention": [], "cross_entropy": [], "errors": []}

    def stage(name, fn, *args):
        t0 = time.time()
        try:
            out = fn(*args)
            out["seconds"] = round(time.time() - t0, 1)
            return out
        except Exception as exc:  # noqa: BLE001 - reported in the summary, exit status 1
            summary["errors"].append({"stage": name, "args": [str(a) for a in args],
                                      "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
            print(f"bench_kernels: {name}{args} failed: {exc}", file=sys.stderr)
            return None

    if GPU:
        bf16 = torch.bfloat16
        checks = [(check_attention, 2048, 4, 32, 128, 32, bf16),   # the timed shape (Pythia-6.9B heads)
                  (check_attention, 16384, 1, 4, 128, 32, bf16),   # midtraining length
                  (check_attention, 1000, 2, 4, 80, 20, bf16)]     # Pythia-2.8B heads, odd length
        if ARGS.all_head_dims:
            checks += [(check_attention, 1000, 2, 4, 64, 16, bf16), (check_attention, 600, 2, 4, 256, 64, bf16)]
        checks += [(check_cross_entropy, 8192, 50432, bf16)]
        timings = [(time_attention, s, 4, 32, 128, 32, bf16) for s in (int(x) for x in ARGS.seqs.split(","))]
        ce_timings = [(time_cross_entropy, 8192, 50432, bf16)]
    else:  # interpreter: fp32/fp16 only (its tl.dot on bf16 is wrong)
        checks = [(check_attention, 40, 1, 2, 64, 16, torch.float32),
                  (check_attention, 33, 1, 2, 80, 20, torch.float16),
                  (check_cross_entropy, 24, 300, torch.float32)]
        timings = [(time_attention, 32, 1, 2, 64, 16, torch.float32)]
        ce_timings = [(time_cross_entropy, 16, 300, torch.float32)]

    for fn, *args in checks:
        res = stage(fn.__name__, fn, *args)
        if res is not None:
            summary["correctness"].append({"check": fn.__name__, **res})
            print(f"[{time.time() - t_start:6.1f}s] {fn.__name__}{tuple(args)}: ok={res['ok']} {res['rel_err']}",
                  file=sys.stderr, flush=True)
    for fn, *args in timings:
        res = stage(fn.__name__, fn, *args)
        if res is not None:
            summary["attention"].append(res)
            print(f"[{time.time() - t_start:6.1f}s] attention s={args[0]}: fused {res['fused']} "
                  f"stock {res['torch_rotary_sdpa']} speedup {res['speedup_fwd_bwd']}", file=sys.stderr, flush=True)
    for fn, *args in ce_timings:
        res = stage(fn.__name__, fn, *args)
        if res is not None:
            summary["cross_entropy"].append(res)
            print(f"[{time.time() - t_start:6.1f}s] cross-entropy: {res}", file=sys.stderr, flush=True)

    correct = bool(summary["correctness"]) and all(c["ok"] for c in summary["correctness"])
    summary["correctness_ok"] = correct and not summary["errors"]
    summary["targets_met"] = {
        "attention_fwd_bwd_at_least_sdpa": (all(a["meets_target"] for a in summary["attention"])
                                            if summary["attention"] else None),
        "cross_entropy_1_5x": (all(c["meets_target"] for c in summary["cross_entropy"])
                               if summary["cross_entropy"] else None),
    }
    if ARGS.smoke:
        summary["targets_met"] = "not measured (smoke run on the CPU interpreter)"
    summary["seconds"] = round(time.time() - t_start, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if ARGS.json:
        from megatron_sfm.utils.io import write_json

        write_json(ARGS.json, summary)
    return 0 if summary["correctness_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
