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
    from megatron_sfm.model.state_dict_adapter import _HF_IGNORED, hf_key_to_megatron

    expected = expected_hf_shapes(model_cfg, model_cfg.padded_vocab(1))
    for key in weights.keys():  # noqa: SIM118 - HFWeights, not a dict
        if _HF_IGNORED.search(key):
            continue
        hf_key_to_megatron(key)  # unknown tensors are an error naming the key
    for key, shape in expected.items():
        if key not in weights:
            raise SfmError(f"{hf_dir}: tensor {key!r} is missing (config.json describes {model_cfg.num_layers} "
                           "layers)")
        found = weights.shape(key)
        if tuple(found) != tuple(shape):
            raise SfmError(f"{hf_dir}: tensor {key!r} has shape {list(found)} but config.json implies "
                           f"{list(shape)} (mismatched architecture)")


def expected_hf_shapes(model_cfg, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """HF file key -> shape for a GPTNeoX with ``model_cfg``'s architecture, in file order."""
    h, f = model_cfg.hidden_size, model_cfg.ffn_size
    out: dict[str, tuple[int, ...]] = {"gpt_neox.embed_in.weight": (padded_vocab, h)}
    for i in range(model_cfg.num_layers):
        p = f"gpt_neox.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
            p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
            p + "attention.query_key_value.weight": (3 * h, h), p + "attention.query_key_value.bias": (3 * h,),
            p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
            p + "mlp.dense_h_to_4h.weight": (f, h), p + "mlp.dense_h_to_4h.bias": (f,),
            p + "mlp.dense_4h_to_h.weight": (h, f), p + "mlp.dense_4h_to_h.bias": (h,),
        })
    out["gpt_neox.final_layer_norm.weight"] = (h,)
    out["gpt_neox.final_layer_norm.bias"] = (h,)
    out["embed_out.weight"] = (padded_vocab, h)
    return out


def plan_import(hf_dir: str | os.PathLike, tp: int, pp: int, dtype: str = "fp32"):
    """Validate ``hf_dir`` against the target layout; return the RunConfig to write."""
    from megatron_sfm.config.loader import config_from_dict, config_to_dict
    from megatron_sfm.conversion.hf_config import model_config_from_hf, read_hf_config
    from megatron_sfm.conversion.hf_weights import HFWeights

    hf_dir = Path(hf_dir)
    if dtype not in IMPORT_DTYPES:
        raise SfmError(f"--dtype {dtype!r}: expected one of {', '.join(IMPORT_DTYPES)}")
    if tp < 1 or pp < 1:
        raise SfmError(f"--tp {tp} --pp {pp}: both must be at least 1")
    config = read_hf_config(hf_dir)
    model_cfg = model_config_from_hf(config, path=str(hf_dir / "config.json"),
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
                   dtype: str = "fp32", timeout: float = 3600) -> Path:
    """Convert a Hugging Face GPTNeoX folder to our checkpoint at layout (``tp``, ``pp``).

    ``dtype`` is the dtype the tensors are stored in (fp32 keeps fp16/bf16/fp32 weights
    exactly). Returns the checkpoint root (with ``latest`` and ``iter_0000000``).
    The write is atomic: ``out_dir`` appears only when complete. An existing non-empty
    ``out_dir`` is an error.
    """
    from megatron_sfm.config.loader import dump_config
    from megatron_sfm.conversion import layout
    from megatron_sfm.utils.io import atomic_path, write_json

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    run = plan_import(hf_dir, tp, pp, dtype)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SfmError(f"{out_dir}: exists and is not empty (refusing to overwrite a checkpoint)")
    with atomic_path(out_dir, is_dir=True) as tmp:
        iter_dir = tmp / layout.iteration_dir_name(0)
        iter_dir.mkdir()
        _launch_workers(hf_dir, iter_dir, run, timeout)
        train_state = initial_train_state(run)
        dump_config(run, iter_dir / layout.CONFIG)
        write_json(iter_dir / layout.TRAIN_STATE, train_state)
        write_manifest(iter_dir)
        dump_config(run, tmp / layout.CONFIG)
        (tmp / layout.LATEST).write_text("0\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp made it private
    return out_dir


def initial_train_state(run) -> dict[str, Any]:
    p = run.parallel
    return {
        "format_version": 1,
        "iteration": 0,
        "consumed_train_samples": 0,
        "consumed_valid_samples": 0,
        "skipped_steps": 0,
        "tokens": 0,
        "phase": 0,
        "seq_length": run.model.seq_length,
        "parallel": {"tensor_model_parallel_size": p.tensor_model_parallel_size,
                     "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                     "virtual_pipeline_model_parallel_size": None, "data_parallel_size": 1,
                     "world_size": p.tensor_model_parallel_size * p.pipeline_model_parallel_size},
        "distrib_optim_sharding_type": None,
        "megatron_core": _megatron_core_version(),
        "reason": "import",
    }


def _megatron_core_version() -> str:
    from megatron_sfm.compat import megatron_core_version

    return megatron_core_version()


def write_manifest(iter_dir: Path) -> None:
    """``manifest.json``: every file of the folder with its size in bytes (written last)."""
    from megatron_sfm.conversion.layout import MANIFEST
    from megatron_sfm.utils.io import write_json

    files = {p.relative_to(iter_dir).as_posix(): p.stat().st_size
             for p in sorted(iter_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json(iter_dir / MANIFEST, {"format_version": 1, "files": files})


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
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    from megatron_sfm.model.state_dict_adapter import megatron_key_to_hf

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
            hf_key, index = hf_slice_for(sh, megatron_key_to_hf)
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

