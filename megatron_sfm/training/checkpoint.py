"""Checkpoints through Megatron-Core ``dist_checkpointing`` (torch_dist); layout in docs/checkpoints.md.

Save: every rank writes its shards into ``<save>/.iter_NNNNNNN.tmp``; once all ranks are
done rank 0 writes ``config.yaml``, ``train_state.json`` and ``manifest.json``, renames
the folder to ``iter_NNNNNNN`` and only then replaces ``latest``. With
``checkpoint.async_save`` (on GPU; on CPU only when ``SFM_ASYNC_SAVE_ON_CPU=1``) the shard
writing runs in a forked background process and the finalisation runs, on all ranks
together, once every rank's writer has finished (:class:`CheckpointManager`).

Load: the manifest is checked first, so a missing or truncated shard is an
:class:`SfmError` naming the file. The distributed optimizer is saved
``fully_reshardable``, so a checkpoint loads at another TP/PP/DP layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
# The distributed optimizer's default ("fully_sharded_model_space") fails in 0.16.1
# (shared/megatron-core-cpu.md 5e); fully_reshardable also reshards TP/PP. The
# mem-efficient variant avoids a .cuda() call and works on gloo.
DOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                 "distrib_optim_fully_reshardable_mem_efficient": True}
# Megatron's async save runs on CPU + gloo too: the CPU shims S-dev and S-sync cover the
# CUDA calls of async_utils, and the writer, forked when the save is scheduled, sees the
# tensors as they were then (copy-on-write). On CPU the writer competes with training for
# the same cores, so there it is opt-in (docs/checkpoints.md#async-save); the tests set it.
ASYNC_ON_CPU_ENV = "SFM_ASYNC_SAVE_ON_CPU"
# Test hook (SFM_FAULTS 'slow_async_save@N'): the background writer of iteration N's save
# sleeps this long before writing, so a test can act while that save is in flight.
SLOW_ASYNC_SAVE_S = 5.0


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(save_dir: str | os.PathLike) -> Optional[Path]:
    """The folder ``<save_dir>/latest`` names, or None when there is no complete checkpoint."""
    save_dir = Path(save_dir)
    marker = save_dir / LATEST
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise SfmError(f"{marker}: expected an iteration number, found {text[:40]!r}") from None
    folder = save_dir / iter_dir_name(iteration)
    if not folder.exists():
        old = save_dir / f".{iter_dir_name(iteration)}.old"  # crash while replacing the same iteration
        if old.exists():
            return old
        raise SfmError(f"{marker}: names iteration {iteration} but {folder} does not exist")
    return folder


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from either an ``iter_*`` folder or a save folder with ``latest``."""
    path = Path(path)
    if (path / TRAIN_STATE).exists() or (path / MANIFEST).exists() or (path / ".metadata").exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise SfmError(f"{path}: no checkpoint here (neither an iter_* folder nor a folder with a 'latest' marker)")
    return found


def verify_checkpoint(folder: str | os.PathLike) -> dict:
    """Check that every file the manifest lists is present with its size; return train_state.

    Raises SfmError naming the first missing or truncated file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SfmError(f"{folder}: checkpoint folder not found")
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise SfmError(f"{folder}: incomplete checkpoint ({MANIFEST} missing: the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise SfmError(f"{manifest_path}: unreadable ({exc.msg})") from None
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.exists():
            raise SfmError(f"{folder}: checkpoint file {name} is missing (listed in {MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            raise SfmError(f"{folder}: checkpoint file {name} is truncated or changed: {actual} bytes, "
                           f"expected {size}")
    if not (folder / ".metadata").exists():
        raise SfmError(f"{folder}: checkpoint file .metadata is missing")
    try:
        return json.loads((folder / TRAIN_STATE).read_text())
    except FileNotFoundError:
        raise SfmError(f"{folder}: {TRAIN_STATE} is missing") from None


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = path.stat().st_size
    from megatron_sfm.utils.io import write_json

    write_json(folder / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # noqa: BLE001 - tracker not initialised
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def layout(state) -> dict:
    p = state.cfg.parallel
    return {"tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
            "data_parallel_size": state.dp_size, "world_size": state.world_size}


def train_state_dict(state, reason: str) -> dict:
    from megatron_sfm.compat import megatron_core_version

    phase = state.data.phase_at(state.iteration) if state.data is not None else 0
    return {
        "format_version": FORMAT_VERSION,
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "consumed_valid_samples": state.consumed_valid_samples,
        "skipped_steps": state.skipped_steps,
        "tokens": state.consumed_train_samples * state.seq_length,
        "phase": phase,
        "seq_length": state.seq_length,
        "parallel": layout(state),
        "distrib_optim_sharding_type": (DOPT_METADATA["distrib_optim_sharding_type"]
                                        if state.cfg.parallel.use_distributed_optimizer else None),
        "megatron_core": megatron_core_version(),
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def use_async_save(cfg) -> bool:
    """Whether saves go through Megatron's async path: ``checkpoint.async_save`` on GPU, and
    on CPU only when the environment has ``SFM_ASYNC_SAVE_ON_CPU=1``."""
    if not cfg.checkpoint.async_save:
        return False
    return torch.cuda.is_available() or os.environ.get(ASYNC_ON_CPU_ENV, "") == "1"


def _sleep_then(seconds: float, fn, *args, **kwargs):
    time.sleep(seconds)
    return fn(*args, **kwargs)


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def model_sharded_state_dict(state) -> dict:
    # From the bare module: the DDP wrapper's version has 'module.' keys (megatron-core-cpu.md 5d).
    chunks = state.unwrapped()
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)}


def _prepare_optimizer_for_loading(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state; its loading path asserts on that."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not any(sub.optimizer.state.values()):
            sub._init_optimizer_states_with_dummy_values()


def full_sharded_state_dict(state, *, is_loading: bool, with_optimizer: bool = True, reason: str = "") -> dict:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd = model_sharded_state_dict(state)
    if with_optimizer:
        model_sd = {}
        for v in sd.values():
            model_sd.update(v)
        if is_loading:
            _prepare_optimizer_for_loading(state.optimizer)
        sd["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=DOPT_METADATA)
        sd["opt_param_scheduler"] = state.scheduler.state_dict()
    sd["train_state"] = train_state_dict(state, reason) if not is_loading else {}
    pp, tp = (parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_world_size())
    sd["rng_state"] = ShardedObject(
        "rng_state", _rng_state(), (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank())
    return sd


class CheckpointManager:
    """Saves (sync, or async: :func:`use_async_save`) and loads checkpoints under ``checkpoint.save``.

    An async save returns once the shards are planned and the background writer is
    forked; :meth:`finalize` (called every step), the next :meth:`save` and :meth:`close`
    finalise it: only then is the folder renamed and ``latest`` rewritten.
    """

    def __init__(self, state, save_dir: Optional[str]):
        self.state = state
        self.save_dir = Path(save_dir) if save_dir else None
        self.async_save = use_async_save(state.cfg)
        self._queue = None
        self._parallel_strategy = None
        self.last_saved_iteration: Optional[int] = None

    # ---- saving -------------------------------------------------------------------
    def save(self, reason: str = "interval") -> Optional[Path]:
        """Save the current state; returns the final folder (written when finalised)."""
        from megatron.core import dist_checkpointing

        from megatron_sfm.training.step import fault_at

        if self.save_dir is None:
            return None
        self.finalize(blocking=True)  # one save in flight at a time
        state = self.state
        name = iter_dir_name(state.iteration)
        tmp = self.save_dir / f".{name}.tmp"
        final = self.save_dir / name
        if _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        sd = full_sharded_state_dict(state, is_loading=False, reason=reason)
        train_state = sd["train_state"]
        request = dist_checkpointing.save(sd, str(tmp), sharded_strategy=self._save_strategy(),
                                          validate_access_integrity=True, async_sharded_save=self.async_save)
        crash = fault_at("crash_in_save", state.iteration)

        def finalize():
            _barrier()
            if crash:  # test hook: die after the shards are written, before the rename
                os.kill(os.getpid(), 9)
            if _rank() == 0:
                self._finalize_on_rank0(tmp, final, train_state)
            _barrier()

        if request is not None:
            if request.async_fn is not None and fault_at("slow_async_save", state.iteration):
                request = request._replace(async_fn=partial(_sleep_then, SLOW_ASYNC_SAVE_S, request.async_fn))
            request.add_finalize_fn(finalize)
            if self._queue is None:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
        else:
            finalize()
        self.last_saved_iteration = state.iteration
        return final

    def _save_strategy(self):
        """torch_dist; with DP>1 each replicated shard is written by one DP rank (as Megatron-LM)."""
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = get_default_save_sharded_strategy("torch_dist")
        if self.state.cfg.checkpoint.fully_parallel_save and self.state.dp_size > 1:
            if self._parallel_strategy is None:
                self._parallel_strategy = FullyParallelSaveStrategyWrapper(
                    strategy, parallel_state.get_data_parallel_group(with_context_parallel=True),
                    do_cache_distribution=True)
            return self._parallel_strategy
        return strategy

    def _finalize_on_rank0(self, tmp: Path, final: Path, train_state: dict) -> None:
        from megatron_sfm.config import dump_config
        from megatron_sfm.utils.io import atomic_path, write_json

        dump_config(self.state.cfg, tmp / CONFIG)
        write_json(tmp / TRAIN_STATE, train_state)
        _write_manifest(tmp)
        old = final.parent / f".{final.name}.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        with atomic_path(self.save_dir / LATEST) as t:
            t.write_text(f"{train_state['iteration']}\n")
        dump_config(self.state.cfg, self.save_dir / CONFIG)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.save_dir.glob(".iter_*.tmp"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        keep = self.state.cfg.checkpoint.keep_last
        if keep > 0:
            folders = sorted(p for p in self.save_dir.glob("iter_*") if p.is_dir())
            for stale in folders[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
        log.info("saved checkpoint %s", final)

    def finalize(self, blocking: bool = False) -> None:
        """Run the finalisation of finished async saves (all ranks must call it together)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        self.finalize(blocking=True)
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    # ---- loading ------------------------------------------------------------------
    def load(self, path: str | os.PathLike, *, load_optimizer: bool = True) -> dict:
        """Resume from ``path`` (iter folder or save folder): model, optimizer, scheduler, progress."""
        from megatron.core import dist_checkpointing

        state = self.state
        folder = resolve_checkpoint(path)
        saved = verify_checkpoint(folder)
        same_layout = saved.get("parallel", {}) == layout(state)
        sd = full_sharded_state_dict(state, is_loading=True, with_optimizer=load_optimizer)
        if not same_layout:
            sd.pop("rng_state")
        loaded = _load(dist_checkpointing, sd, folder)
        _load_model(state, loaded)
        if load_optimizer:
            try:
                state.optimizer.load_state_dict(loaded["optimizer"])
            except Exception as exc:  # noqa: BLE001
                raise SfmError(f"{folder}: optimizer state does not fit this model/optimizer: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
            state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        else:
            state.optimizer.reload_model_params()
        if "rng_state" in loaded:
            _set_rng_state(loaded["rng_state"])
        state.iteration = int(saved["iteration"])
        state.consumed_train_samples = int(saved["consumed_train_samples"])
        state.consumed_valid_samples = int(saved.get("consumed_valid_samples", 0))
        state.skipped_steps = int(saved.get("skipped_steps", 0))
        state.consecutive_nonfinite = 0
        from megatron_sfm.training.state import reset_train_iterators

        reset_train_iterators(state)
        return saved

    def init_from(self, path: str | os.PathLike) -> dict:
        """Midtraining: weights only; optimizer, scheduler and progress start fresh."""
        from megatron.core import dist_checkpointing

        state = self.state
        folder = resolve_checkpoint(path)
        saved = verify_checkpoint(folder)
        sd = model_sharded_state_dict(state)
        loaded = _load(dist_checkpointing, sd, folder)
        _load_model(state, loaded)
        state.optimizer.reload_model_params()
        return saved


def _load(dist_checkpointing, sd: dict, folder: Path) -> dict:
    # torch's CheckpointException derives from BaseException, not Exception
    from torch.distributed.checkpoint.api import CheckpointException

    # torch.distributed.checkpoint logs its metadata-read fallbacks with tracebacks on the
    # root logger (0.16.1 + torch 2.13); quiet it while loading: failures become one clear line.
    dcp_log = logging.getLogger()
    level = dcp_log.level
    dcp_log.setLevel(logging.ERROR)
    try:
        return dist_checkpointing.load(sd, str(folder))
    except SfmError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - one clear line instead of internals
        text = str(exc).strip()
        lines = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln] or text.splitlines() or [""]
        first = lines[-1].strip()
        raise SfmError(f"{folder}: cannot load checkpoint ({type(exc).__name__}: {first[:300]})") from exc
    finally:
        dcp_log.setLevel(level)


def _load_model(state, loaded: dict) -> None:
    chunks = state.unwrapped()
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        try:
            chunk.load_state_dict(loaded[key], strict=True)
        except RuntimeError as exc:
            raise SfmError(f"checkpoint model weights do not fit this model: {str(exc).splitlines()[0]}") from exc


def load_model_weights(model_chunks: list, path: str | os.PathLike) -> dict:
    """Load the model weights of a checkpoint into bare GPTModel chunks (any layout).

    For tools (conversion, evaluation): call after ``initialize_parallel`` and
    ``build_gpt_model``; returns the checkpoint's train_state. Needs a ``__main__`` guard
    in the calling script (dist_checkpointing uses multiprocessing).
    """
    from megatron.core import dist_checkpointing

    folder = resolve_checkpoint(path)
    saved = verify_checkpoint(folder)
    sd = {key: m.sharded_state_dict() for key, m in zip(_model_keys(len(model_chunks)), model_chunks)}
    loaded = _load(dist_checkpointing, sd, folder)
    for key, m in zip(_model_keys(len(model_chunks)), model_chunks):
        m.load_state_dict(loaded[key], strict=True)
    return saved
