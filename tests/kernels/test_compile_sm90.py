"""The Triton kernels compile for an H100 (sm_90) with the installed Triton, on the CPU.

Runs ``benchmarks/triton_compile_check.py``'s quick subset from this process: the real
launchers run on meta tensors here, their launches are recorded and compiled for a stub
sm_90 driver (no GPU). On the CPU this session imports Triton with the interpreter on
(``conftest.py``), which makes Triton's own ``tl.cdiv``/``tl.softmax`` interpreter objects,
so the check then compiles in a spawned worker with the interpreter off; either way it
must leave this session's interpreter untouched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

CHECK_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "triton_compile_check.py"


@pytest.fixture(scope="module")
def check():
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend to compile for sm_90")
    spec = importlib.util.spec_from_file_location("triton_compile_check", CHECK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _by_kernel(rows):
    out = {}
    for row in rows:
        out.setdefault(row["kernel"], []).append(row)
    return out


def test_quick_subset_compiles_for_sm90(check, tmp_path):
    interpret_before = os.environ.get("TRITON_INTERPRET")
    rows = check.run_check(check.all_cases(quick=True), jobs=1, cache_dir=str(tmp_path))

    failed = [f"{r['kernel']} {r['case']} {r['config']}: {r['error']}" for r in rows if r["status"] != "ok"]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n".join(failed)
    by_kernel = _by_kernel(rows)
    # Every kernel the launchers start, with every autotune configuration they would try.
    assert {k: len(v) for k, v in by_kernel.items()} == {
        "_attn_fwd": 2, "_bwd_delta": 1, "_attn_bwd_dkdv": 2, "_attn_bwd_dq": 2, "_ce_fwd": 3, "_ce_bwd": 3}
    for row in rows:
        assert row["regs"] and row["regs"] <= 255, row
        assert 0 <= row["shared_bytes"] <= check.H100_MAX_SHARED_BYTES, row
    assert all(r["shared_bytes"] > 0 for r in by_kernel["_attn_fwd"])  # tl.dot operands staged in shared memory
    # The interpreter of this session is untouched, and nothing was written to the user's cache.
    assert os.environ.get("TRITON_INTERPRET") == interpret_before
    assert any(tmp_path.rglob("*.cubin"))


def test_launches_are_the_gpu_launches(check):
    """Recorded on meta tensors in an interpreter session, the launches are still the GPU ones."""
    kmod = check.compiled_kernel_module("_attention_kernels")
    case = check.AttentionCase("bf16", 80, 0.25, 1000)
    launches = check.record_launches(case)
    assert [launch.name for launch in launches] == ["fwd_tuned", "bwd_delta", "dkdv_tuned", "dq_tuned"]
    fwd = launches[0]
    assert fwd.kwargs == {"HEAD_DIM": 80, "ROT_HALF": 10, "HP": 16, "PA": 64, "PB": 0, "DV": 128, "CAUSAL": True,
                          "UPCAST": False, "IEEE": False}
    q = fwd.args[0]
    # q, k, v are views of Megatron's fused qkv [s, b, h, 3 * d], read in place.
    assert q.device.type == "meta" and q.stride() == (2 * 32 * 240, 32 * 240, 240, 1)
    assert fwd.args[1].data_ptr() - q.data_ptr() == 80 * 2

    def configs(units, kernel):
        return [(u.kwargs["BLOCK_M"], u.kwargs["BLOCK_N"], u.kwargs["num_warps"], u.kwargs["num_stages"])
                for u in units if u.kernel == kernel]

    def expected(cfgs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cfgs]

    units = check.expand_units(case, launches)
    assert configs(units, "_attn_fwd") == expected(kmod._FWD)
    assert configs(units, "_attn_bwd_dkdv") == expected(kmod._DKDV)
    assert configs(units, "_attn_bwd_dq") == expected(kmod._DQ)
    # Head dim 256: the kernels' early_config_prune keeps only the large-head configurations.
    big = check.AttentionCase("bf16", 256, 0.25, 2048)
    units = check.expand_units(big, check.record_launches(big))
    assert configs(units, "_attn_fwd") == expected(kmod._FWD_LARGE)
    assert configs(units, "_attn_bwd_dkdv") == expected(kmod._DKDV_LARGE)
    assert configs(units, "_attn_bwd_dq") == expected(kmod._DQ_LARGE)
    # The trainer's loss path: source ids, weights, the autotuned kernels with every config.
    loss = check.LossCase(4, True)
    names = [launch.name for launch in check.record_launches(loss)]
    assert names == ["fwd_tuned", "bwd_tuned"]
    ce_units = check.expand_units(loss, check.record_launches(loss))
    assert {u.kwargs["HAS_SRC"] for u in ce_units} == {True} and {u.kwargs["HAS_W"] for u in ce_units} == {True}
    assert len(ce_units) == 2 * len(check.compiled_kernel_module("_cross_entropy_kernels")._CONFIGS)


BROKEN_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def small_dot(X, Out, B: tl.constexpr):
    i = tl.arange(0, B)
    x = tl.load(X + i[:, None] * B + i[None, :])
    tl.store(Out + i[:, None] * B + i[None, :], tl.dot(x, x))
"""

# Compiles BROKEN_KERNEL with the check's functions in a fresh process (interpreter off).
COMPILE_BROKEN = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("triton_compile_check", sys.argv[1])
check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = check
spec.loader.exec_module(check)
import torch
module = check.load_compiled_module(sys.argv[2], "broken_kernel")
x = torch.empty(8, 8, device="meta", dtype=torch.float16)
out = torch.empty(8, 8, device="meta", dtype=torch.float32)
unit = check.Unit("small_dot", "fp16 8x8", "B=8", module.small_dot, (1,), (x, out), {"B": 8})
with check.sm90_compile_environment(sys.argv[3]):
    row = check.compile_unit(unit)
print(json.dumps({"row": row, "table": check.format_table([row])}))
"""


def test_a_kernel_that_does_not_compile_is_reported(check, tmp_path):
    # Fine under the interpreter (8x8 tiles), not on a GPU: tl.dot needs dimensions >= 16.
    kernel = tmp_path / "broken_kernel.py"
    kernel.write_text(BROKEN_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_BROKEN, str(CHECK_PATH), str(kernel),
                           str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row = result["row"]
    assert row["status"] == "error"
    assert "16" in row["error"] and "\n" not in row["error"], row["error"]
    assert "small_dot" in result["table"] and "error: " + row["error"] in result["table"]


def test_cli_usage_errors(check, capsys):
    assert check.main(["--quick", "--only", "no-such-kernel"]) == 2
    assert "matches no kernel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        check.main(["--jobs", "0"])
    assert exc.value.code == 2
