"""Checkpoints through Megatron-Core ``dist_checkpointing`` (torch_dist); layout in docs/checkpoints.md.

Save: every rank writes its shards into ``<save>/.iter_NNNNNNN.tmp``; once all ranks are
done rank 0 writes ``config.yaml``, ``train_state.json`` and ``manifest.json``, renames
the folder to ``iter_NNNNNNN`` and only then replaces ``latest``. With
``checkpoint.async_save`` (on GPU; on CPU only when ``SFM_ASYNC_SAVE_ON_CPU=1``) the shard
writing runs in a forked background process and the finalisation runs, on all ranks
together, once every rank's writer has finished (:class:`CheckpointManager`).

Every rank's writer checksums the files it wrote (in the background process for an async
save) and rank 0 merges them into the manifest. Load: the manifest, the sizes and the
content checksums are checked first (the hashing split over the ranks), so a missing,
truncated or changed shard is an :class:`SfmError` naming the file; then the saved
schedule is compared with this run's (:data:`SCHEDULE_KEYS`). The distributed optimizer
is saved ``fully_reshardable``, so a checkpoint loads at another TP/PP/DP layout. The
format itself (layout, manifest, train_state schema) is :mod:`megatron_sfm.checkpoint_format`.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_sfm import checkpoint_format as fmt
from megatron_sfm.checkpoint_format import (  # noqa: F401 - re-exported: the trainer's names for them
    CONFIG,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    TRAIN_STATE,
    iteration_dir_name,
    latest_checkpoint,
    resolve_checkpoint,
)
from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

# The distributed optimizer's default ("fully_sharded_model_space") fails in 0.16.1
# ("ShardedTensor.flattened_range is not supported"; docs/megatron-core-compat.md); fully_reshardable also reshards TP/PP. The
# mem-efficient variant avoids a .cuda() call and works on gloo.
DOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                 "distrib_optim_fully_reshardable_mem_efficient": True}
# Megatron's async save runs on CPU + gloo too: the CPU shims S-dev and S-sync cover the
# CUDA calls of async_utils, and the writer, forked when the save is scheduled, sees the
# tensors as they were then (copy-on-write). On CPU the writer competes with training for
# the same cores, so there it is opt-in (docs/checkpoints.md#async-save); the tests set it.
ASYNC_ON_CPU_ENV = "SFM_ASYNC_SAVE_ON_CPU"
# Settings that define the training schedule: resuming with another value is refused
# unless checkpoint.allow_schedule_change (docs/checkpoints.md#schedule-changes).
SCHEDULE_KEYS = (
    "training.train_iters", "training.global_batch_size", "model.seq_length",
    "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_iters", "optimizer.warmup_fraction",
    "optimizer.decay_style", "data.blend", "data.phases", "data.stage", "data.mock",
)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def verify_checkpoint(folder: str | os.PathLike, *, checksums: bool = True) -> dict:
    """Check every file the manifest lists (present, size, content checksum); return train_state.

    In a distributed job every rank must call it: the files to hash are split over the
    ranks and the first error found on any rank is raised on all of them. Raises
    SfmError naming the first missing, truncated or damaged file.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fmt.verify_checkpoint(folder, checksums=checksums)
    error = None
    try:
        fmt.verify_files(folder, checksums=checksums, share=(dist.get_rank(), dist.get_world_size()))
    except SfmError as exc:
        error = str(exc)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise SfmError(first)
    return fmt.read_train_state(folder)


DATA_FILE_KEYS = ("data.blend", "data.phases")


def schedule_changes(saved_cfg, cfg, saved_data: dict | None = None,
                     data_now: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every :data:`SCHEDULE_KEYS` entry that differs.

    ``data.blend`` / ``data.phases`` are compared by content when the checkpoint recorded
    it (``saved_data``: its ``train_state.json`` ``data_sha256``; ``data_now``: this run's
    :func:`~megatron_sfm.training.data.data_fingerprint`): the same data reached by
    another path (a relative path, another mount) is no change, and a file whose content
    changed under the same path is one.
    """
    out = []
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        old = getattr(getattr(saved_cfg, section), name)
        new = getattr(getattr(cfg, section), name)
        if key in DATA_FILE_KEYS and old and new and saved_data and key in saved_data and data_now \
                and key in data_now:
            if saved_data[key] != data_now[key]:
                out.append((key, f"{old} (content sha256 {saved_data[key][:12]})",
                            f"{new} (content sha256 {data_now[key][:12]})"))
            continue
        if old != new:
            out.append((key, old, new))
    return out


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
    phase = state.data.phase_at(state.iteration) if state.data is not None else 0
    return fmt.make_train_state(
        iteration=state.iteration, consumed_train_samples=state.consumed_train_samples,
        consumed_valid_samples=state.consumed_valid_samples, skipped_steps=state.skipped_steps,
        seq_length=state.seq_length, phase=phase, parallel=layout(state),
        distrib_optim_sharding_type=(DOPT_METADATA["distrib_optim_sharding_type"]
                                     if state.cfg.parallel.use_distributed_optimizer else None),
        reason=reason, **({"data_sha256": state.extra["data_sha256"]} if state.extra.get("data_sha256") else {}))


def use_async_save(cfg) -> bool:
    """Whether saves go through Megatron's async path: ``checkpoint.async_save`` on GPU, and
    on CPU only when the environment has ``SFM_ASYNC_SAVE_ON_CPU=1``."""
    if not cfg.checkpoint.async_save:
        return False
    return torch.cuda.is_available() or os.environ.get(ASYNC_ON_CPU_ENV, "") == "1"


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def model_sharded_state_dict(state) -> dict:
    # From the bare module: the DDP wrapper's version has 'module.' keys (megatron-core-cpu.md 5d).
    chunks = state.unwrapped()
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)}


def _prepare_optimizer_for_loading(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state; its loading path asserts on that (compat W-dopt-empty)."""
    from megatron_sfm.compat import prepare_optimizer_for_loading

    prepare_optimizer_for_loading(optimizer)


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


def _written_files(async_fn_args) -> list[str]:
    """The files one rank's torch_dist writer writes: the file names of its write buckets."""
    buckets = async_fn_args[1] if len(async_fn_args) > 1 else ()
    try:
        return [str(bucket[0]) for bucket in buckets]
    except (TypeError, IndexError):  # another layout of the request: rank 0 hashes them at finalize
        return []


def _write_then_hash(write_fn, folder: str, rank: int, *args, **kwargs):
    """Run the shard writer, then checksum the files it wrote (still in the page cache).

    Runs where the writer runs: in the trainer for a synchronous save, in the forked
    background process for an async one. The checksums go to a per-rank sidecar that
    rank 0 merges into ``manifest.json``.
    """
    result = write_fn(*args, **kwargs)
    files = _written_files(args)
    if files:
        fmt.write_checksum_sidecar(folder, rank, files)
    return result


def with_checksums(request, folder: str | os.PathLike):
    """The AsyncRequest of ``dist_checkpointing.save``, its writer also recording checksums."""
    if request.async_fn is None:  # this rank writes nothing
        return request
    return request._replace(async_fn=partial(_write_then_hash, request.async_fn, str(folder), _rank()))


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
        # schedule changes accepted with checkpoint.allow_schedule_change (kept in train_state.json)
        self.schedule_changes: list[dict] = []

    # ---- saving -------------------------------------------------------------------
    def save(self, reason: str = "interval") -> Optional[Path]:
        """Save the current state; returns the final folder (written when finalised)."""
        from megatron.core import dist_checkpointing

        if self.save_dir is None:
            return None
        self.finalize(blocking=True)  # one save in flight at a time
        state = self.state
        name = iteration_dir_name(state.iteration)
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
        if self.schedule_changes:
            train_state["schedule_changes"] = list(self.schedule_changes)
        # Always through Megatron's AsyncRequest (a sync save runs it in place, as
        # dist_checkpointing does itself), so the writer can checksum what it wrote.
        request = dist_checkpointing.save(sd, str(tmp), sharded_strategy=self._save_strategy(),
                                          validate_access_integrity=True, async_sharded_save=True)
        request = with_checksums(request, tmp)

        def finalize():
            _barrier()
            if _rank() == 0:
                self._finalize_on_rank0(tmp, final, train_state)
            _barrier()

        request.add_finalize_fn(finalize)
        if self.async_save:
            if self._queue is None:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
        else:
            request.execute_sync()
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
        fmt.write_run_config(tmp, self.state.cfg)
        fmt.write_train_state(tmp, train_state)
        fmt.write_manifest(tmp)  # last: merges the writers' checksums, hashes the small files
        old = final.parent / f".{final.name}.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fmt.write_latest(self.save_dir, train_state["iteration"])
        fmt.write_run_config(self.save_dir, self.state.cfg)
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
        """Resume from ``path`` (iter folder or save folder): model, optimizer, scheduler, progress.

        The folder is verified first (manifest, sizes, checksums unless
        ``checkpoint.verify_checksums`` is false), then the saved config's schedule is
        compared with this run's (:meth:`check_schedule`).
        """
        from megatron.core import dist_checkpointing

        state = self.state
        folder = resolve_checkpoint(path)
        saved = verify_checkpoint(folder, checksums=state.cfg.checkpoint.verify_checksums)
        self.check_schedule(folder, saved)
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

    def check_schedule(self, folder: Path, saved: dict) -> None:
        """Refuse to resume with another schedule (:data:`SCHEDULE_KEYS`) than the checkpoint's.

        With ``checkpoint.allow_schedule_change`` the change is accepted, logged (warning,
        rank 0) and recorded in the next checkpoints' ``train_state.json``
        (``schedule_changes``).
        """
        cfg = self.state.cfg
        data_now = self.state.extra.get("data_sha256")
        if data_now is None and not cfg.data.mock:
            from megatron_sfm.training.data import data_fingerprint

            data_now = data_fingerprint(cfg)
        changes = schedule_changes(fmt.read_run_config(folder), cfg, saved.get("data_sha256"), data_now)
        self.schedule_changes = list(saved.get("schedule_changes", []))
        if not changes:
            return
        config_path = folder / CONFIG
        if not cfg.checkpoint.allow_schedule_change:
            key, old, new = changes[0]
            more = f" (and {', '.join(k for k, _, _ in changes[1:])})" if len(changes) > 1 else ""
            raise SfmError(f"{key}: {new!r} differs from {old!r} in the checkpoint's {config_path}{more}; "
                           "resuming with another schedule is refused (set checkpoint.allow_schedule_change=true "
                           "if intended, or start a new run with checkpoint.init_from)")
        iteration = int(saved["iteration"])
        for key, old, new in changes:
            self.schedule_changes.append({"iteration": iteration, "key": key, "saved": old, "now": new})
            if _rank() == 0:
                log.warning("checkpoint.allow_schedule_change: resuming %s at iteration %d with %s changed "
                            "from %r to %r", folder, iteration, key, old, new)

    def init_from(self, path: str | os.PathLike) -> dict:
        """Midtraining: weights only; optimizer, scheduler and progress start fresh."""
        from megatron.core import dist_checkpointing

        state = self.state
        folder = resolve_checkpoint(path)
        saved = verify_checkpoint(folder, checksums=state.cfg.checkpoint.verify_checksums)
        sd = model_sharded_state_dict(state)
        loaded = _load(dist_checkpointing, sd, folder)
        _load_model(state, loaded)
        state.optimizer.reload_model_params()
        return saved


def _load(dist_checkpointing, sd: dict, folder: Path) -> dict:
    # torch's CheckpointException derives from BaseException, not Exception
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_sfm.compat import quiet_root_logger

    # torch.distributed.checkpoint logs its metadata-read fallbacks with tracebacks on the
    # root logger (compat W-dcp-log); quiet it while loading: failures become one clear line.
    try:
        with quiet_root_logger():
            return dist_checkpointing.load(sd, str(folder))
    except SfmError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - one clear line instead of internals
        text = str(exc).strip()
        lines = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln] or text.splitlines() or [""]
        first = lines[-1].strip()
        raise SfmError(f"{folder}: cannot load checkpoint ({type(exc).__name__}: {first[:300]})") from exc


def _load_model(state, loaded: dict) -> None:
    chunks = state.unwrapped()
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        try:
            chunk.load_state_dict(loaded[key], strict=True)
        except RuntimeError as exc:
            raise SfmError(f"checkpoint model weights do not fit this model: {str(exc).splitlines()[0]}") from exc


def load_model_weights(model_chunks: list, path: str | os.PathLike, *, verify_checksums: bool = True) -> dict:
    """Load the model weights of a checkpoint into bare GPTModel chunks (any layout).

    For tools (conversion, evaluation): call after ``initialize_parallel`` and
    ``build_gpt_model``; returns the checkpoint's train_state. Needs a ``__main__`` guard
    in the calling script (dist_checkpointing uses multiprocessing).
    """
    from megatron.core import dist_checkpointing

    folder = resolve_checkpoint(path)
    saved = verify_checkpoint(folder, checksums=verify_checksums)
    sd = {key: m.sharded_state_dict() for key, m in zip(_model_keys(len(model_chunks)), model_chunks)}
    loaded = _load(dist_checkpointing, sd, folder)
    for key, m in zip(_model_keys(len(model_chunks)), model_chunks):
        m.load_state_dict(loaded[key], strict=True)
    return saved
