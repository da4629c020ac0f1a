"""``sfm convert from-hf``: a Pythia-style Hugging Face folder -> our dist_checkpointing checkpoint.

The checkpoint is written by the real model code: ``tp * pp`` CPU processes (gloo,
launched with torchrun) each build Megatron-Core's GPTModel for its (TP, PP) rank, fill
every tensor of ``model.sharded_state_dict()`` with its slice of the Hugging Face
tensor (read from the safetensors file, slice only), and save it with
``dist_checkpointing.save``. The files therefore have exactly the keys, shapes and chunk
layout that ``sfm train`` writes at that layout (docs/checkpoints.md), and each process
holds only its part of the model.

The folder gets ``latest`` (``0``) and ``iter_0000000/`` with the tensors, ``config.yaml``
(model section from ``config.json``), ``train_state.json`` (iteration 0) and
``manifest.json``. Use it with ``checkpoint.init_from`` (midtraining) or ``checkpoint.load``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.utils.net import free_port

log = logging.getLogger(__name__)

WORKER = "megatron_sfm.conversion._worker"
IMPORT_DTYPES = ("fp32", "bf16", "fp16")


def _tokenizer_size(hf_dir: Path) -> int | None:
    """The number of tokens of the tokenizer shipped in ``hf_dir`` (None when there is none)."""
    if not (hf_dir / "tokenizer.json").exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise SfmError(f"{hf_dir / 'tokenizer.json'}: cannot be read ({str(exc).splitlines()[0]})") from None


def check_hf_tensors(weights, model_cfg, hf_dir: Path) -> None:
    """Every tensor GPTNeoX needs is present with the shape ``config.json`` implies."""
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

    expected = GPTNeoXAdapter.hf_shapes(model_cfg, model_cfg.padded_vocab(1))
    for key in weights.keys():  # noqa: SIM118 - HFWeights, not a dict
        if GPTNeoXAdapter.is_ignored_hf_key(key):
            continue
        GPTNeoXAdapter.from_hf_key(key)  # unknown tensors are an error naming the key
    for key, shape in expected.items():
        if key not in weights:
            raise SfmError(f"{hf_dir}: tensor {key!r} is missing (config.json describes {model_cfg.num_layers} "
                           "layers)")
        found = weights.shape(key)
        if tuple(found) != tuple(shape):
            raise SfmError(f"{hf_dir}: tensor {key!r} has shape {list(found)} but config.json implies "
                           f"{list(shape)} (mismatched architecture)")


def plan_import(hf_dir: str | os.PathLike, tp: int, pp: int, dtype: str = "fp32"):
    """Validate ``hf_dir`` against the target layout; return the RunConfig to write."""
    from megatron_sfm.config.loader import config_from_dict, config_to_dict
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter, read_hf_config
    from megatron_sfm.conversion.hf_weights import HFWeights

    hf_dir = Path(hf_dir)
    if dtype not in IMPORT_DTYPES:
        raise SfmError(f"--dtype {dtype!r}: expected one of {', '.join(IMPORT_DTYPES)}")
    if tp < 1 or pp < 1:
        raise SfmError(f"--tp {tp} --pp {pp}: both must be at least 1")
    config = read_hf_config(hf_dir)
    model_cfg = GPTNeoXAdapter.model_config(config, path=str(hf_dir / "config.json"),
                                     tokenizer_vocab_size=_tokenizer_size(hf_dir), precision=dtype)
    weights = HFWeights(hf_dir)
    check_hf_tensors(weights, model_cfg, hf_dir)
    padded = model_cfg.padded_vocab(1)
    if model_cfg.num_attention_heads % tp:
        raise SfmError(f"--tp {tp}: does not divide num_attention_heads {model_cfg.num_attention_heads}")
    if model_cfg.ffn_size % tp:
        raise SfmError(f"--tp {tp}: does not divide intermediate_size {model_cfg.ffn_size}")
    if padded % tp:
        raise SfmError(f"--tp {tp}: does not divide the embedding rows (config.json vocab_size {padded}); "
                       "Megatron splits the vocabulary evenly over TP ranks")
    if model_cfg.num_layers % pp:
        raise SfmError(f"--pp {pp}: does not divide num_hidden_layers {model_cfg.num_layers}")
    model = config_to_dict(model_cfg)
    model["attention_backend"] = "auto"  # the writers run on CPU (sdpa); training picks its own
    data = {}
    if (hf_dir / "tokenizer.json").exists():  # to-hf picks it up again from data.tokenizer
        data["tokenizer"] = str((hf_dir / "tokenizer.json").resolve())
    run = config_from_dict({
        "model": model,
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "data": data,
    })
    return run


def import_from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                   dtype: str = "fp32", timeout: float = 3600, overwrite: bool = False) -> Path:
    """Convert a Hugging Face GPTNeoX folder to our checkpoint at layout (``tp``, ``pp``).

    ``dtype`` is the dtype the tensors are stored in (fp32 keeps fp16/bf16/fp32 weights
    exactly). Returns the checkpoint root (with ``latest`` and ``iter_0000000``).
    The write is atomic: ``out_dir`` appears only when complete. An existing non-empty
    ``out_dir`` is an error unless ``overwrite`` (then it is replaced once the import succeeded).
    """
    from megatron_sfm import checkpoint_format as fmt
    from megatron_sfm.utils.io import atomic_path

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    run = plan_import(hf_dir, tp, pp, dtype)
    from megatron_sfm.utils.io import check_output_dir

    check_output_dir(out_dir, overwrite=overwrite)
    with atomic_path(out_dir, is_dir=True) as tmp:
        iter_dir = tmp / fmt.iteration_dir_name(0)
        iter_dir.mkdir()
        _launch_workers(hf_dir, iter_dir, run, timeout)
        fmt.write_run_config(iter_dir, run)
        fmt.write_train_state(iter_dir, initial_train_state(run))
        fmt.write_manifest(iter_dir)  # last: sizes and checksums of every file
        fmt.write_run_config(tmp, run)
        fmt.write_latest(tmp, 0)
        tmp.chmod(0o755)  # mkdtemp made it private
    return out_dir


def initial_train_state(run) -> dict[str, Any]:
    """``train_state.json`` of an imported checkpoint: iteration 0, nothing consumed."""
    from megatron_sfm.checkpoint_format import make_train_state

    p = run.parallel
    return make_train_state(
        iteration=0, consumed_train_samples=0, seq_length=run.model.seq_length, reason="import",
        parallel={"tensor_model_parallel_size": p.tensor_model_parallel_size,
                  "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                  "virtual_pipeline_model_parallel_size": None, "data_parallel_size": 1,
                  "world_size": p.tensor_model_parallel_size * p.pipeline_model_parallel_size})


def _launch_workers(hf_dir: Path, iter_dir: Path, run, timeout: float) -> None:
    """Run the per-rank writers (torchrun, gloo, CPU) and raise their error on failure."""
    from megatron_sfm.config.loader import config_to_dict

    world = run.parallel.tensor_model_parallel_size * run.parallel.pipeline_model_parallel_size
    with tempfile.TemporaryDirectory(prefix="sfm-import-") as scratch:
        args = {"hf_dir": str(hf_dir), "iter_dir": str(iter_dir), "run": config_to_dict(run)}
        args_path = Path(scratch) / "args.json"
        args_path.write_text(json.dumps(args), encoding="utf-8")
        error_path = Path(scratch) / "error.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", WORKER, "import", str(args_path), str(error_path)]
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ""  # conversion runs on CPU with gloo, whatever the node has
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if error_path.exists():  # an SfmError raised on some rank
            raise SfmError(error_path.read_text(encoding="utf-8").strip().splitlines()[0])
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise SfmError(f"from-hf: the writer processes failed (exit {proc.returncode}):\n{tail}")


# --------------------------------------------------------------------------- per rank

def import_rank(hf_dir: str, iter_dir: str, run: dict) -> None:
    """Body run on every rank: build this rank's model part, fill it from HF, save."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_sfm.config.loader import config_from_dict
    from megatron_sfm.conversion.hf_weights import HFWeights
    from megatron_sfm.model.builder import build_gpt_model, transformer_config
    from megatron_sfm.model.parallel import initialize_parallel
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

    cfg = config_from_dict(run)
    initialize_parallel(cfg.parallel, seed=0)
    # No random init: every parameter is overwritten below.
    tconfig = transformer_config(cfg.model, cfg.parallel, perform_initialization=False)
    model = build_gpt_model(cfg.model, cfg.parallel, config=tconfig, parallel_output=False)
    sharded = model.sharded_state_dict()
    weights = HFWeights(hf_dir)
    filled = 0
    with torch.no_grad():
        for sh in nested_values(sharded):
            if not isinstance(sh, ShardedTensor):
                continue
            if sh.flattened_range is not None:
                raise SfmError(f"{sh.key}: flattened shards are not expected in a model state dict")
            hf_key, index = hf_slice_for(sh, GPTNeoXAdapter.to_hf_key)
            part = weights.get(hf_key, index)
            if tuple(part.shape) != tuple(sh.data.shape):
                raise SfmError(f"{hf_dir}: {hf_key} slice {index} has shape {list(part.shape)}, "
                               f"expected {list(sh.data.shape)}")
            sh.data.copy_(part)
            filled += 1
    if filled == 0:
        raise SfmError("from-hf: the model has no tensors on this rank")
    dist_checkpointing.save({"model": sharded}, iter_dir)
    torch.distributed.barrier()


def hf_slice_for(sh, key_to_hf) -> tuple[str, list[slice]]:
    """(HF file key, index into the HF tensor) of one Megatron ShardedTensor's local data.

    Stacked layer tensors carry ``prepend_axis_num`` leading axes (the global layer
    index); the remaining axes are the TP split of the HF tensor.
    """
    lead = sh.prepend_axis_num
    if lead not in (0, 1):
        raise SfmError(f"{sh.key}: {lead} prepended axes (expected 0, or 1 for stacked layers)")
    name = sh.key
    if lead == 1:
        if not name.startswith("decoder.layers."):
            raise SfmError(f"{sh.key}: unexpected stacked tensor outside decoder.layers")
        name = f"decoder.layers.{sh.global_offset[0]}.{name[len('decoder.layers.'):]}"
    offsets = sh.global_offset[lead:]
    index = [slice(o, o + n) for o, n in zip(offsets, sh.local_shape)]
    return key_to_hf(name), index

