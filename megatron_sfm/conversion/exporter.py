"""``sfm convert to-hf``: our dist_checkpointing checkpoint (any TP/PP/DP) -> Hugging Face GPTNeoX.

Streaming: the export plan (every Hugging Face tensor, its shape and dtype) comes from the
checkpoint's metadata; the safetensors headers are written first, then each tensor is read
from the torch_dist files (only the chunks of that layer), cast, appended and dropped.
Peak memory is about the largest single tensor (the embedding) plus one stored chunk,
independent of the number of layers and of the TP/PP layout that wrote the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_RECORD = "sfm_export.json"  # what the export was made from, and how it was checked (docs/conversion.md)
_LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class ExportItem:
    """One Hugging Face tensor: where it comes from in the checkpoint."""

    hf_key: str
    ckpt_key: str
    layer: int | None  # index on the stacked layer axis, None for global tensors
    shape: tuple[int, ...]


def _expected_shapes(model, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Our full-model key -> shape, in Hugging Face file order."""
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

    return {GPTNeoXAdapter.from_hf_key(k): v for k, v in GPTNeoXAdapter.hf_shapes(model, padded_vocab).items()}


def plan_export(reader, model, where: str) -> tuple[list[ExportItem], int]:
    """Map every tensor of the GPTNeoX model onto the checkpoint; check shapes.

    Returns the items in Hugging Face file order and the padded vocabulary size (the
    embedding rows stored in the checkpoint). A missing tensor or a shape that disagrees
    with the config is an :class:`SfmError` naming the key.
    """
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

    emb = "embedding.word_embeddings.weight"
    if emb not in reader:
        raise SfmError(f"{where}: tensor {emb!r} is missing (not a GPT model checkpoint, or an optimizer-only one)")
    padded = reader.shape(emb)[0]
    expected = _expected_shapes(model, padded)
    items = []
    layer_keys: dict[str, str] = {}
    for name, alias in GPTNeoXAdapter.layer_params():
        key = _LAYER_PREFIX + name
        if key not in reader and alias is not None and _LAYER_PREFIX + alias in reader:
            key = _LAYER_PREFIX + alias
        layer_keys[name] = key
    for ours, shape in expected.items():
        if ours.startswith(_LAYER_PREFIX):
            index_text, rest = ours[len(_LAYER_PREFIX):].split(".", 1)
            layer = int(index_text)
            key = layer_keys[rest]
            stored_shape = (model.num_layers, *shape)
        else:
            layer, key, stored_shape = None, ours, shape
        if key not in reader:
            raise SfmError(f"{where}: tensor {key!r} is missing from the checkpoint")
        found = reader.shape(key)
        if tuple(found) != tuple(stored_shape):
            raise SfmError(f"{where}: tensor {key!r} has shape {list(found)} but the checkpoint's config.yaml "
                           f"implies {list(stored_shape)} (mismatched architecture)")
        items.append(ExportItem(GPTNeoXAdapter.to_hf_key(ours), key, layer, tuple(shape)))
    return items, padded


def _resolve_tokenizer(tokenizer: str | None, run) -> Path | None:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise SfmError(f"--tokenizer {tokenizer}: not found")
        return path
    configured = getattr(run.data, "tokenizer", None)
    if configured and Path(configured).exists():
        log.info("tokenizer: using data.tokenizer from the checkpoint's config (%s)", configured)
        return Path(configured)
    return None


def load_hf_tokenizer(path: Path):
    """A transformers tokenizer from a Hugging Face folder or a ``tokenizer.json`` file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        if path.suffix == ".json":
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
            vocab = tok.get_vocab()
            for special in ("<|endoftext|>", "</s>", "<eos>"):
                if special in vocab:
                    tok.eos_token = tok.bos_token = tok.unk_token = special
                    break
            return tok
    except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise many types
        raise SfmError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    raise SfmError(f"{path}: unsupported tokenizer (give a Hugging Face tokenizer folder or a tokenizer.json)")


def _prepare_output(out_dir: Path, overwrite: bool = False) -> None:
    """``out_dir`` must be missing or empty unless ``overwrite`` (the rule of every output folder)."""
    from megatron_sfm.utils.io import check_output_dir

    check_output_dir(out_dir, overwrite=overwrite)


def export_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, iteration: int | None = None,
                 dtype: str = "fp32", tokenizer: str | None = None, verify: bool = False, *,
                 max_shard_bytes: int | None = None, verify_tolerance: float | None = None,
                 progress: bool = False, overwrite: bool = False, verify_checksums: bool = True) -> Path:
    """Export a checkpoint of ``sfm train`` (or ``from-hf``) as a ``GPTNeoXForCausalLM`` folder.

    ``ckpt_dir`` is a checkpoint root (``latest`` picks the iteration unless ``iteration``
    is given) or one ``iter_*`` folder. ``dtype``: fp32, bf16 or fp16 for the saved
    weights. ``tokenizer``: a tokenizer folder or ``tokenizer.json`` saved alongside
    (default: the checkpoint config's ``data.tokenizer`` when that path exists).
    ``verify``: compare the logits of our model and the exported one and fail above the
    tolerance (see :mod:`megatron_sfm.conversion.verify`). The folder is written
    atomically; a non-empty ``out_dir`` is an error unless ``overwrite``, which replaces it
    (atomically, once the export succeeded). The checkpoint folder is verified first
    (manifest, sizes, and content checksums unless ``verify_checksums`` is false);
    ``sfm_export.json`` records ``checksums_verified`` (:func:`read_export_checksums`).
    Returns ``out_dir``.
    """
    from megatron_sfm import checkpoint_format as fmt
    from megatron_sfm.conversion.dcp_reader import DCPReader
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter
    from megatron_sfm.conversion.hf_writer import (
        DEFAULT_MAX_SHARD_BYTES,
        TensorSpec,
        write_sharded,
    )
    from megatron_sfm.utils.io import atomic_path

    if dtype not in EXPORT_DTYPES:
        raise SfmError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    torch_dtype = EXPORT_DTYPES[dtype]
    out_dir = Path(out_dir)
    iter_dir = fmt.resolve_checkpoint(ckpt_dir, iteration)
    train_state = fmt.verify_checkpoint(iter_dir, checksums=verify_checksums)
    checksums_verified = fmt.checksums_verified(iter_dir, checksums=verify_checksums)
    run = fmt.read_run_config(iter_dir)
    model = run.model
    tok_path = _resolve_tokenizer(tokenizer, run)
    tok = load_hf_tokenizer(tok_path) if tok_path is not None else None
    _prepare_output(out_dir, overwrite)

    with DCPReader(iter_dir) as reader:
        items, padded = plan_export(reader, model, str(iter_dir))
        reader.check_files(sorted({item.ckpt_key for item in items}))  # before writing anything
        tp_saved = run.parallel.tensor_model_parallel_size
        if padded != model.padded_vocab(tp_saved):
            raise SfmError(f"{iter_dir}: the embedding has {padded} rows but config.yaml implies "
                           f"{model.padded_vocab(tp_saved)} (model.vocab_size {model.vocab_size}, TP {tp_saved})")
        tok_size = len(tok) if tok is not None else model.vocab_size
        if tok_size > padded:
            raise SfmError(f"{tok_path}: the tokenizer has {tok_size} tokens, more than the model's {padded} "
                           "embedding rows")
        eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else 0
        bos = tok.bos_token_id if tok is not None and tok.bos_token_id is not None else eos
        by_name = {item.hf_key: item for item in items}
        specs = [TensorSpec(item.hf_key, item.shape, torch_dtype) for item in items]

        def produce(spec: TensorSpec) -> torch.Tensor:
            item = by_name[spec.name]
            if item.layer is None:
                tensor = reader.read(item.ckpt_key)
            else:
                tensor = reader.read(item.ckpt_key, [slice(item.layer, item.layer + 1)])[0]
            return tensor.to(torch_dtype)

        with atomic_path(out_dir, is_dir=True) as tmp:
            tmp.chmod(0o755)
            with _progress(len(specs), enabled=progress) as advance:
                write_sharded(tmp, specs, produce, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, on_tensor=advance)
            config = GPTNeoXAdapter.hf_config(model, padded, dtype, bos_token_id=bos, eos_token_id=eos,
                                    tokenizer_vocab_size=tok_size)
            _write_json(tmp / "config.json", config)
            _write_json(tmp / "generation_config.json", GPTNeoXAdapter.generation_config(bos, eos))
            if tok is not None:
                tok.save_pretrained(str(tmp))
            _write_json(tmp / EXPORT_RECORD, {
                "source": str(Path(iter_dir).resolve()), "iteration": train_state["iteration"],
                "checksums_verified": checksums_verified,
                "dtype": dtype, "padded_vocab_size": padded, "tokenizer_vocab_size": tok_size,
                "saved_layout": {"tensor_model_parallel_size": tp_saved,
                                 "pipeline_model_parallel_size": run.parallel.pipeline_model_parallel_size}})
            if verify:
                from megatron_sfm.conversion.verify import verify_export

                result = verify_export(iter_dir, tmp, dtype=dtype, tolerance=verify_tolerance)
                _write_json(tmp / "sfm_verify.json", result)
    return out_dir


def read_export_checksums(hf_dir: str | os.PathLike) -> bool | None:
    """``checksums_verified`` of the ``sfm_export.json`` in ``hf_dir`` (an ``sfm convert
    to-hf`` folder): True when every checkpoint file's content was hashed and matched its
    manifest during the export, False when hashing was skipped (``--no-verify-checksums``)
    or the manifest held sizes only, None (unknown) for an export written before the field
    existed. A missing or unreadable file, or another value, is an :class:`SfmError`
    naming the file and key."""
    from megatron_sfm.utils.readers import optional_bool, read_json

    path = Path(hf_dir) / EXPORT_RECORD
    return optional_bool(read_json(path).get("checksums_verified"), f"{path}: checksums_verified")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """A rich progress bar over the exported tensors; yields the per-tensor callback."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("to-hf tensors"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("tensors", total=total)
        yield lambda _spec: bar.advance(task)
