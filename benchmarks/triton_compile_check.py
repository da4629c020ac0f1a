"""Compile every Triton kernel our launchers start, for an H100 (sm_90), without a GPU.

A kernel that fails to compile on the GPU wastes a GPU session; this finds out on a CPU.
For each case (attention forward + backward at the Pythia head dims, rotary fractions
0.25 and 1.0, bf16 and fp16, causal, sequence lengths 2048, 16384 and 1000; the fused
cross-entropy forward + backward at vocabulary 50432, bf16 logits, with and without
per-source ids and weights) the real launch code runs on ``meta`` tensors
(``rotary_flash_attention`` forward and backward through autograd, the trainer's
``fused_loss``) with the kernel modules replaced by recorders, so every kernel launch is
captured with the exact arguments, constexprs and autotune configurations (after the
kernels' own ``early_config_prune``) a GPU run would use. Each launch is then compiled
with Triton's own ``JITFunction.warmup`` (the same argument specialisation as a launch:
pointer alignment, integers divisible by 16 or equal to 1) under a stub driver that
reports an sm_90 CUDA target; ptxas is the one bundled with Triton. Launches that
Triton would compile to the same binary (for example lengths 2048 and 16384) are
compiled once. A binary that needs more shared memory than an H100 block may use
(232,448 bytes; Triton checks this only when it loads the kernel) is an error too.

    python benchmarks/triton_compile_check.py [--quick] [--jobs N] [--only REGEX] [--json PATH]

Prints one row per kernel x case x configuration: ``ok`` or ``error`` with the first
line of the error; exit status 1 when anything failed, 2 on a usage error. Run it with
the Triton of the GPU image (e.g. ``/path/to/venv/bin/python benchmarks/...``) to
check that version. See docs/kernels.md ("Compile check").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

H100_MAX_SHARED_BYTES = 232448  # largest shared memory one block may use on sm_90 (227 KiB, opt-in)
TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size

# Heads (TP=1) of a Pythia model with each head dim: 410M, 2.8B, 6.9B, 1B.
HEADS_BY_HEAD_DIM = {64: 16, 80: 32, 128: 32, 256: 8}
PYTHIA_VOCAB = 50432  # padded vocabulary of Pythia-6.9B
# The fixed blocks the GPU run of tests/kernels pins (attention.GPU_TEST_BLOCKS, set by tests/kernels/conftest.py).
def _gpu_test_blocks() -> tuple:
    from megatron_sfm.kernels import attention

    return tuple(sorted(attention.GPU_TEST_BLOCKS.items()))


# ----------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """Fused rotary attention forward + backward, Megatron layout (q, k, v views of one qkv)."""

    dtype: str  # "bf16" | "fp16" | "fp32"
    head_dim: int
    rotary_fraction: float
    seq_len: int
    batch: int = 2
    fixed_blocks: Optional[tuple] = None  # attention.FIXED_BLOCKS as a tuple of items (GPU test runs)

    @property
    def heads(self) -> int:
        return HEADS_BY_HEAD_DIM.get(self.head_dim, 8)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)  # Megatron: int(kv_channels * rotary_percent)

    @property
    def label(self) -> str:
        fixed = " fixed" if self.fixed_blocks else ""
        return f"{self.dtype} d{self.head_dim} r{self.rotary_dim} s{self.seq_len}{fixed}"


@dataclasses.dataclass(frozen=True)
class LossCase:
    """Fused cross-entropy forward + backward as the trainer runs it (``fused_loss``).

    ``num_sources=0`` calls ``fused_cross_entropy`` directly with ``source_ids=None``.
    """

    num_sources: int
    weighted: bool
    vocab: int = PYTHIA_VOCAB
    dtype: str = "bf16"
    seq_len: int = 2048
    batch: int = 2

    @property
    def label(self) -> str:
        src = "no source ids" if self.num_sources == 0 else f"{self.num_sources} source" + "s" * (self.num_sources > 1)
        return f"{self.dtype} V{self.vocab} {src}{' weighted' if self.weighted else ''}"


def all_cases(quick: bool = False, gpu_test_blocks: bool = False) -> list:
    """The cases to check. ``quick``: the few most representative (see docs/kernels.md)."""
    if quick:
        return [AttentionCase("bf16", 80, 0.25, 1000), LossCase(4, True)]
    cases: list = []
    for dtype in ("bf16", "fp16"):
        for head_dim in (64, 80, 128, 256):
            for fraction in (0.25, 1.0):
                for seq_len in (2048, 16384, 1000):
                    cases.append(AttentionCase(dtype, head_dim, fraction, seq_len))
    cases += [LossCase(0, False), LossCase(0, True), LossCase(1, False), LossCase(4, False), LossCase(4, True)]
    if gpu_test_blocks:
        # The GPU run of tests/kernels fixes the blocks and tests fp32 and fp16 (at small
        # shapes; a length that is not a multiple of 16 stands in for them here).
        for dtype in ("fp32", "fp16"):
            for head_dim in (64, 80, 128, 256):
                cases.append(AttentionCase(dtype, head_dim, 0.25, 1000, fixed_blocks=_gpu_test_blocks()))
    return cases


# ----------------------------------------------------------------------------------------
# compile environment: compiled (not interpreted) kernel modules, a stub sm_90 driver
# ----------------------------------------------------------------------------------------


class Sm90Driver:
    """The parts of a Triton driver that compiling (not launching) a kernel asks for."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(*TARGET)

    @classmethod
    def is_active(cls) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def __getattr__(self, name):
        raise AttributeError(f"triton_compile_check: the stub sm_90 driver cannot {name!r} (compile only, no GPU)")


@contextlib.contextmanager
def _environ(**values: Optional[str]):
    def apply(settings: dict) -> None:  # None: unset
        for k, v in settings.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(old)


def load_compiled_module(path: str, name: str):
    """Import the file ``path`` as a fresh module ``name`` with ``TRITON_INTERPRET`` unset.

    Triton decides between compiling and interpreting when ``@triton.jit`` runs, so this
    gives compilable kernels even in a process (a test session) that set the interpreter;
    the fresh name leaves the interpreter-mode modules in ``sys.modules`` untouched.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with _environ(TRITON_INTERPRET=None):
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def _kernel_module_path(name: str) -> str:
    spec = importlib.util.find_spec("megatron_sfm.kernels")
    return os.path.join(next(iter(spec.submodule_search_locations)), f"{name}.py")


_COMPILED_MODULES: dict = {}


def compiled_kernel_module(name: str):
    """``megatron_sfm.kernels.<name>`` loaded for compiling (cached per process)."""
    if name not in _COMPILED_MODULES:
        _COMPILED_MODULES[name] = load_compiled_module(_kernel_module_path(name), f"_sfm_compile_check_{name}")
    return _COMPILED_MODULES[name]


@contextlib.contextmanager
def sm90_compile_environment(cache_dir: Optional[str] = None):
    """Stub sm_90 driver active, interpreter off, Triton's cache in ``cache_dir``; all restored after."""
    from triton.runtime.driver import driver

    env = {"TRITON_INTERPRET": None, "TRITON_DUMP_PTXAS_LOG": "1"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    previous = driver.__dict__.get("_active")  # reset_active() would create the real (absent) CUDA driver
    with _environ(**env):
        driver.set_active(Sm90Driver())
        try:
            yield
        finally:
            driver._active = previous


# ----------------------------------------------------------------------------------------
# recording the launches
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    name: str  # attribute of the kernel module the launcher used (fwd_tuned, bwd_delta, ...)
    kernel: Any  # JITFunction or Autotuner
    grid: Any
    args: tuple
    kwargs: dict


class _RecordingKernel:
    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.name, self.kernel, grid, args, dict(kwargs)))

        return record


class _RecordingModule:
    """Stands in for a kernel module: its kernels record their launches instead of running."""

    INTERPRETED = False

    def __init__(self, module, launches):
        self._module, self._launches = module, launches

    def __getattr__(self, name):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        value = getattr(self._module, name)
        if isinstance(value, (JITFunction, Autotuner)):
            return _RecordingKernel(name, value, self._launches)
        return value


@contextlib.contextmanager
def _recording(launches: list):
    """Route the launchers' ``load_kernel_module`` to recorders over the compiled modules."""
    from megatron_sfm.kernels import attention, cross_entropy

    def load(name, what, *tensors):
        return _RecordingModule(compiled_kernel_module(name), launches)

    saved = (attention.load_kernel_module, cross_entropy.load_kernel_module, attention.FIXED_BLOCKS)
    attention.load_kernel_module = cross_entropy.load_kernel_module = load
    try:
        yield
    finally:
        attention.load_kernel_module, cross_entropy.load_kernel_module, attention.FIXED_BLOCKS = saved


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def record_launches(case) -> list[Launch]:
    """Run the launch code of ``case`` on meta tensors; the kernel launches it makes, in order."""
    from megatron_sfm.kernels import attention

    launches: list[Launch] = []
    with _environ(TRITON_INTERPRET=None), _recording(launches):
        attention.FIXED_BLOCKS = dict(case.fixed_blocks) if getattr(case, "fixed_blocks", None) else None
        if isinstance(case, AttentionCase):
            _run_attention(case)
        else:
            _run_loss(case)
    return launches


def _run_attention(case: AttentionCase):
    import torch

    from megatron_sfm.kernels.attention import rotary_flash_attention

    s, b, h, d = case.seq_len, case.batch, case.heads, case.head_dim
    meta = {"device": "meta", "dtype": _torch_dtype(case.dtype)}
    # Megatron's fused qkv projection output [s, b, h * 3d], split per head into q | k | v views.
    qkv = torch.empty(s, b, h, 3 * d, requires_grad=True, **meta)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    half = case.rotary_dim // 2
    # The Megatron glue passes fp32 [s, rotary_dim / 2] tables (model/triton_attention.py).
    cos = torch.empty(s, half, device="meta", dtype=torch.float32) if half else None
    sin = torch.empty(s, half, device="meta", dtype=torch.float32) if half else None
    out = rotary_flash_attention(q, k, v, rotary_dim=case.rotary_dim, rotary_cos=cos, rotary_sin=sin, causal=True)
    out.backward(torch.empty_like(out))  # the gradient from linear_proj: contiguous [s, b, h, d]


def _run_loss(case: LossCase):
    import torch

    from megatron_sfm.kernels.cross_entropy import fused_cross_entropy
    from megatron_sfm.training.loss import fused_loss

    s, b, vocab = case.seq_len, case.batch, case.vocab
    logits = torch.empty(s, b, vocab, device="meta", dtype=_torch_dtype(case.dtype), requires_grad=True)
    labels = torch.empty(b, s, device="meta", dtype=torch.long)
    n_src = max(case.num_sources, 1)
    weights = torch.empty(n_src, device="meta", dtype=torch.float32) if case.weighted else None
    if case.num_sources == 0:
        loss = fused_cross_entropy(logits.view(s * b, vocab), labels.t().reshape(-1), None, 1, weights)[0].sum()
    else:  # the trainer's path (training.cross_entropy=fused)
        loss_mask = torch.empty(b, s, device="meta", dtype=torch.float32)
        source_ids = torch.empty(b, device="meta", dtype=torch.long)
        loss = fused_loss(labels, loss_mask, source_ids, case.num_sources, weights, logits)[0]
    loss.backward()


# ----------------------------------------------------------------------------------------
# compile units
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
    """One kernel binary a GPU run would compile: a launch with one autotune configuration."""

    kernel: str  # kernel function name
    case: str
    config: str
    fn: Any  # JITFunction
    grid: Any
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, num_stages, ...)


def _config_label(kwargs: dict) -> str:
    blocks = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_V") if k in kwargs)
    warps = kwargs.get("num_warps", 4)  # Triton's CUDA defaults when a launch gives none
    stages = kwargs.get("num_stages", 3)
    return f"{blocks} w{warps} s{stages}"


def expand_units(case, launches: list[Launch]) -> list[Unit]:
    """Each launch as the binaries it needs: one per autotune configuration that survives pruning."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    units = []
    for launch in launches:
        kernel = launch.kernel
        if isinstance(kernel, Autotuner):
            kernel.nargs = dict(zip(kernel.arg_names, launch.args))  # as Autotuner.run sets it
            try:
                configs = kernel.prune_configs(dict(launch.kwargs))
            finally:
                kernel.nargs = None
            fn = kernel.fn
            variants = [{**launch.kwargs, **c.all_kwargs()} for c in configs]
        else:
            fn, variants = kernel, [launch.kwargs]
        if not isinstance(fn, JITFunction):
            raise TypeError(f"triton_compile_check: {launch.name} wraps {type(fn).__name__}, not a JITFunction")
        for kwargs in variants:
            units.append(Unit(fn.fn.__name__, case.label, _config_label(kwargs), fn, launch.grid, launch.args,
                              kwargs))
    return units


def binary_key(unit: Unit) -> Optional[str]:
    """Triton's own cache key for the binary this unit compiles to (no compiling), or None."""
    from triton import knobs

    seen = []

    def hook(*args, key=None, **kwargs):
        seen.append(key)
        return True  # skip the compile

    old = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        unit.fn.warmup(*unit.args, grid=unit.grid, **unit.kwargs)
    except Exception:
        return None  # the real compile will report it
    finally:
        knobs.runtime.jit_cache_hook = old
    return f"{unit.kernel}:{seen[0]}" if seen else None


@contextlib.contextmanager
def _captured_stderr():
    """Collect what C++ (MLIR diagnostics, ptxas) writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        lines: list[str] = []
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


_GENERIC = re.compile(r"^(PassManager::run failed|Internal Triton PTX codegen error|at \d+:\d+:)\s*$")


def first_error_line(exc: BaseException, stderr_lines: list[str] = ()) -> str:
    """The line of a compile error that says what went wrong, prefixed with its type."""
    inner = exc
    while True:  # Triton wraps the failing call site's error in its callers'
        nxt = inner.__cause__ or (inner.__context__ if not inner.__suppress_context__ else None)
        if nxt is None or not isinstance(nxt, Exception):
            break
        inner = nxt
    message = getattr(inner, "error_message", None) or str(inner)
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines + [ln.strip() for ln in stderr_lines]:
        if re.search(r"error", ln, re.IGNORECASE) and not _GENERIC.match(ln):
            return f"{type(inner).__name__}: {ln}"
    specific = [ln for ln in lines if not _GENERIC.match(ln)]
    if specific or lines:
        return f"{type(inner).__name__}: {(specific or lines)[0]}"
    frames = traceback.extract_tb(inner.__traceback__)  # a bare assert: say where it is
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return f"{type(inner).__name__} (no message){where}"


def _register_usage(ptxas_log: str, cubin: bytes) -> dict:
    """Registers and bytes of register spill stores per thread.

    From ptxas' own ``-v`` report (``TRITON_DUMP_PTXAS_LOG``, printed when Triton runs
    ptxas); for a binary taken from Triton's cache, registers from the cubin (Triton's
    cuobjdump) and no spill figure.
    """
    regs = re.findall(r"Used (\d+) registers", ptxas_log)
    spills = re.findall(r"(\d+) bytes spill stores", ptxas_log)
    if regs:
        return {"regs": int(regs[-1]), "spill_bytes": int(spills[-1]) if spills else None}
    try:
        from triton import knobs

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                  capture_output=True, text=True, timeout=60, check=False).stdout
    except Exception:  # no cuobjdump: the figures are extras
        return {}
    found = re.findall(r"\bREG:(\d+)", text)
    return {"regs": int(found[0]) if found else None, "spill_bytes": None}


def compile_unit(unit: Unit) -> dict:
    """Compile one unit for sm_90 (inside :func:`sm90_compile_environment`); its result row."""
    row = {"kernel": unit.kernel, "case": unit.case, "config": unit.config}
    start = time.perf_counter()
    stdout = io.StringIO()  # the ptxas -v log (TRITON_DUMP_PTXAS_LOG) is printed there
    with _captured_stderr() as stderr_lines, contextlib.redirect_stdout(stdout):
        try:
            compiled = unit.fn.warmup(*unit.args, grid=unit.grid, **unit.kwargs)
            if hasattr(compiled, "result"):  # an async-compile future
                compiled = compiled.result()
            error = None
        except Exception as exc:  # any failure is a result to report
            compiled, error = None, exc
    row["seconds"] = round(time.perf_counter() - start, 2)
    if error is not None:
        row.update(status="error", error=first_error_line(error, stderr_lines))
        return row
    meta = compiled.metadata
    row.update(status="ok", shared_bytes=int(meta.shared), num_warps=int(meta.num_warps))
    row.update(_register_usage(stdout.getvalue(), compiled.asm.get("cubin", b"")))
    if row["shared_bytes"] > H100_MAX_SHARED_BYTES:
        row.update(status="error", error=f"OutOfResources: shared memory {row['shared_bytes']} B > "
                                         f"{H100_MAX_SHARED_BYTES} B per block on an H100 (fails at launch)")
    elif row["num_warps"] * TARGET[2] > 1024:
        row.update(status="error", error=f"OutOfResources: {row['num_warps']} warps > 1024 threads per block")
    return row


# ----------------------------------------------------------------------------------------
# driver: plan, compile (optionally in worker processes), report
# ----------------------------------------------------------------------------------------


def unit_text(unit: Unit) -> str:
    """What ``--only`` matches: ``kernel case config``."""
    return f"{unit.kernel} {unit.case} {unit.config}"


def plan(cases: list, only: Optional[str] = None) -> list[tuple[Any, int, Unit]]:
    """(case, index of the unit within its case, unit) for every unit of every case.

    ``only``: a regular expression; units whose :func:`unit_text` it does not match are left out.
    """
    pattern = re.compile(only) if only else None
    out = []
    for case in cases:
        for i, unit in enumerate(expand_units(case, record_launches(case))):
            if pattern is None or pattern.search(unit_text(unit)):
                out.append((case, i, unit))
    return out


_WORKER_UNITS: dict = {}


def _worker_init(cache_dir: Optional[str]):
    stack = contextlib.ExitStack()
    stack.enter_context(sm90_compile_environment(cache_dir))
    _WORKER_UNITS["_stack"] = stack  # kept open for the worker's life


def _worker_compile(case, index: int) -> dict:
    if case not in _WORKER_UNITS:
        _WORKER_UNITS[case] = expand_units(case, record_launches(case))
    return compile_unit(_WORKER_UNITS[case][index])


def compiles_in_this_process() -> bool:
    """False when this process imported Triton with ``TRITON_INTERPRET`` set.

    Triton's own library functions (``tl.cdiv``, ``tl.softmax``, ...) are then interpreter
    objects, and no kernel that uses them can be compiled here: compiling needs a process
    that imports Triton with the interpreter off (a worker, see :func:`run_check`).
    """
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return not any(isinstance(v, InterpretedFunction) for v in vars(standard).values())


def run_check(cases: list, jobs: int = 1, cache_dir: Optional[str] = None, only: Optional[str] = None,
              progress: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Compile every unit of ``cases`` (those matching ``only``); the result rows in plan order.

    Units with the same Triton binary key are compiled once; the later ones get
    ``same_as`` (the row number of the first). ``jobs > 1`` compiles in that many worker
    processes (spawned, with ``TRITON_INTERPRET`` unset); so does ``jobs=1`` in a process
    that cannot compile (:func:`compiles_in_this_process`; a test session running the
    interpreter), which then also skips the dedup. ``cache_dir`` is Triton's cache
    (default: a fresh temporary directory, so every binary is really compiled and the
    user's cache is left alone).
    """
    in_process = jobs <= 1 and compiles_in_this_process()
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sfm-compile-check-"))
        stack.enter_context(sm90_compile_environment(cache_dir))
        planned = plan(cases, only)
        rows: list[Optional[dict]] = [None] * len(planned)
        first_of: dict = {}
        todo = []  # (row index, case, unit index)
        for n, (case, i, unit) in enumerate(planned):
            key = binary_key(unit) if compiles_in_this_process() else None
            if key is not None and key in first_of:
                rows[n] = {"kernel": unit.kernel, "case": unit.case, "config": unit.config, "same_as": first_of[key]}
            else:
                if key is not None:
                    first_of[key] = n
                todo.append((n, case, i))

        def done(n: int, row: dict):
            rows[n] = row
            if progress is not None:
                progress({"row": n, **row})

        if in_process:
            for n, _case, _i in todo:
                done(n, compile_unit(planned[n][2]))
        elif todo:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            if __name__ != "__main__":
                # The workers import this file by its module name (they get this sys.path).
                here = os.path.dirname(os.path.abspath(__file__))
                if here not in sys.path:
                    sys.path.append(here)
                    stack.callback(sys.path.remove, here)
            # Spawned here, the workers inherit the environment without TRITON_INTERPRET.
            with ProcessPoolExecutor(max_workers=max(jobs, 1), mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_worker_init, initargs=(cache_dir,)) as pool:
                futures = {pool.submit(_worker_compile, case, i): n for n, case, i in todo}
                for fut in as_completed(futures):
                    n = futures[fut]
                    try:
                        row = fut.result()
                    except Exception as exc:  # a worker died or could not rebuild the case
                        unit = planned[n][2]
                        row = {"kernel": unit.kernel, "case": unit.case, "config": unit.config, "status": "error",
                               "error": first_error_line(exc)}
                    done(n, row)
    for row in rows:
        if "same_as" in row:
            first = rows[row["same_as"]]
            row.update({k: v for k, v in first.items() if k not in ("kernel", "case", "config", "seconds", "row")})
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per row; the result goes last so that long error lines do not push the others."""

    def dash(value) -> str:
        return "-" if value is None else str(value)

    header = ("#", "kernel", "case", "config", "s", "shared KiB", "regs", "spill B", "result")
    body = []
    for n, r in enumerate(rows):
        result = "ok" if r["status"] == "ok" else f"error: {r['error']}"
        if "same_as" in r:
            result += f" (same binary as #{r['same_as']})"
        shared = f"{r['shared_bytes'] / 1024:.0f}" if r.get("shared_bytes") is not None else None
        seconds = None if "same_as" in r or "seconds" not in r else f"{r['seconds']:.1f}"
        body.append((str(n), r["kernel"], r["case"], r["config"], dash(seconds), dash(shared), dash(r.get("regs")),
                     dash(r.get("spill_bytes")), result))
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + body)


def _write_json_atomic(path: str, payload: dict):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the few most representative cases (what CI compiles)")
    p.add_argument("--gpu-test-blocks", action="store_true",
                   help="also the fixed blocks the GPU run of tests/kernels compiles (fp32, fp16)")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="worker processes (default: CPUs)")
    p.add_argument("--only", metavar="REGEX", help="only rows whose 'kernel case config' matches")
    p.add_argument("--cache-dir", help="Triton cache directory to use (default: a fresh temporary one)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here (atomically)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.only:
        try:
            re.compile(args.only)
        except re.error as exc:
            p.error(f"--only: not a regular expression ({exc})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    cases = all_cases(quick=args.quick, gpu_test_blocks=args.gpu_test_blocks)
    print(f"# triton {triton.__version__}, target sm_{TARGET[1]}, {len(cases)} cases, {args.jobs} jobs", flush=True)
    start = time.time()

    def progress(row):
        status = "ok" if row["status"] == "ok" else "ERROR"
        print(f"  [{row['row']}] {row['kernel']} {row['case']} {row['config']}: {status} ({row['seconds']:.1f} s)",
              file=sys.stderr, flush=True)

    rows = run_check(cases, jobs=args.jobs, cache_dir=args.cache_dir, only=args.only, progress=progress)
    if not rows:
        print(f"triton_compile_check: --only {args.only!r} matches no kernel", file=sys.stderr)
        return 2
    print(format_table(rows))
    errors = [r for r in rows if r["status"] != "ok"]
    unique = sum(1 for r in rows if "same_as" not in r)
    print(f"# {len(rows)} rows, {unique} binaries compiled, {len(errors)} errors, {time.time() - start:.0f} s, "
          f"triton {triton.__version__}")
    if args.json:
        _write_json_atomic(args.json, {"triton": triton.__version__, "target": f"sm_{TARGET[1]}", "rows": rows})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
