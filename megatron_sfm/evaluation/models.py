"""Find and load the models to evaluate.

A model argument is ``PATH`` or ``LABEL=PATH``. ``PATH`` is either

- a Hugging Face folder (``config.json`` + weights + tokenizer files, as written by
  ``sfm convert to-hf``), loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``; or
- one of our checkpoints (a ``latest`` file next to ``iter_*`` folders, or one ``iter_*``
  folder; :func:`megatron_sfm.checkpoint_format.is_checkpoint`), converted on the fly into
  a temporary Hugging Face folder by ``megatron_sfm.conversion`` (``export_to_hf``, as
  ``sfm convert to-hf CKPT --out DIR``: the checkpoint's manifest and file sizes are
  verified first, and its content checksums unless ``verify_checksums=False``, the
  ``--no-verify-checksums`` of ``sfm eval``) and deleted after the evaluation.

:func:`checkpoint_record` says what was verified, for results.json: for a checkpoint,
whether this load hashed its files; for a folder written by ``sfm convert to-hf``, what
its ``sfm_export.json`` recorded about the export's own check; for an ``sfm posttrain``
output, what its ``posttrain.json`` recorded about its source (the export the SFT -> DPO
chain started from).

Precision: bf16 on a GPU, fp32 on CPU (``dtype`` overrides).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_sfm.errors import SfmError


@dataclass(frozen=True)
class ModelSpec:
    label: str
    path: Path


def parse_model_specs(args: list[str]) -> list[ModelSpec]:
    """``PATH`` or ``LABEL=PATH`` arguments -> specs with unique labels (folder names by default)."""
    specs: list[ModelSpec] = []
    for arg in args:
        label, sep, path = arg.partition("=")
        if not sep or not label or os.path.exists(arg):
            label, path = "", arg
        p = Path(path)
        label = label or (p.name if p.name not in ("", ".") else str(p))
        specs.append(ModelSpec(label, p))
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SfmError(f"model label {dupes[0]!r} is used twice; name them with LABEL=PATH")
    return specs


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint root (``latest`` marker file and ``iter_*`` folders) or one ``iter_*`` folder."""
    from megatron_sfm.checkpoint_format import is_checkpoint

    return is_checkpoint(path)


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


CHECKSUMS_SOURCES = ("eval", "export", "posttrain")  # values of a model entry's checksums_source


def checkpoint_record(path: str | os.PathLike, verify_checksums: bool = True) -> dict[str, bool | str | None]:
    """What results.json records about how a model's weights were checked:
    ``checksums_verified`` and ``checksums_source``, where that was decided.

    - Megatron checkpoint: ``checksums_verified`` True when the content of every file was
      hashed and compared with the manifest on this load (call it once
      :func:`hf_folder_for` yielded), False when hashing was skipped
      (``verify_checksums=False``) or the manifest holds sizes only (a checkpoint written
      before checksums existed); source ``"eval"``.
    - Hugging Face folder written by ``sfm convert to-hf`` (it has ``sfm_export.json``): as
      that file records it for the export (True, False, or None: unknown, an export made
      before the file recorded it); source ``"export"``.
    - ``sfm posttrain`` output (it has ``posttrain.json``): as that file records it for the
      run's source model, i.e. the export its SFT -> DPO chain started from (None: unknown,
      a source with no record, or a posttrain.json older than the field); source
      ``"posttrain"``.
    - Any other Hugging Face folder: ``{}`` (no checkpoint, nothing was verified or recorded).

    ``verify_checksums`` plays no part for a Hugging Face folder: its weights were read from
    the checkpoint when it was exported. The rule for Hugging Face folders is
    :func:`megatron_sfm.posttrain.run.recorded_checksums`, the one ``sfm posttrain`` uses.
    """
    p = Path(path)
    if is_hf_folder(p):
        return folder_record(p)
    if not is_megatron_checkpoint(p):
        return {}
    from megatron_sfm import checkpoint_format as fmt

    return {"checksums_verified": fmt.checksums_verified(fmt.resolve_checkpoint(p), checksums=verify_checksums),
            "checksums_source": "eval"}


def folder_record(folder: str | os.PathLike) -> dict[str, bool | str | None]:
    """``{"checksums_verified": True/False/None, "checksums_source": "export"|"posttrain"}``
    from the ``sfm_export.json`` or ``posttrain.json`` of a Hugging Face folder; ``{}`` for
    a folder with neither. A malformed record is an :class:`SfmError` naming the file and
    key (read before the model is loaded)."""
    from megatron_sfm.posttrain.run import MANIFEST, recorded_checksums

    value, record = recorded_checksums(folder)
    if record is None:
        return {}
    return {"checksums_verified": value, "checksums_source": "posttrain" if record.name == MANIFEST else "export"}


def _convert_megatron(ckpt: Path, out: Path, tokenizer: str | os.PathLike | None = None,
                      verify_checksums: bool = True) -> None:
    """Export a Megatron checkpoint to a Hugging Face folder via ``megatron_sfm.conversion``.

    ``verify_checksums=False`` skips hashing the checkpoint's files (presence and sizes
    are still checked by the exporter).
    """
    try:
        from megatron_sfm.conversion import export_to_hf
    except ImportError as exc:
        raise SfmError(
            f"{ckpt}: is a Megatron checkpoint, but megatron_sfm.conversion is not available ({exc}); "
            f"convert it first with 'sfm convert to-hf {ckpt} --out HF_DIR'"
        ) from None
    try:
        if tokenizer is None:  # tokenizer: the checkpoint config's, when it exists
            export_to_hf(ckpt, out, verify_checksums=verify_checksums)
        else:
            export_to_hf(ckpt, out, tokenizer=str(tokenizer), verify_checksums=verify_checksums)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("megatron_sfm"):
            raise
        raise SfmError(
            f"{ckpt}: is a Megatron checkpoint, but on-the-fly conversion is not available in this "
            f"installation ({exc.name} missing); convert it first with 'sfm convert to-hf {ckpt} --out HF_DIR'"
        ) from None
    if not is_hf_folder(out):
        raise SfmError(f"{ckpt}: on-the-fly conversion wrote no Hugging Face folder (no {out / 'config.json'})")


@contextlib.contextmanager
def hf_folder_for(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
                  verify_checksums: bool = True) -> Iterator[Path]:
    """Yield a Hugging Face folder for ``path``, converting a Megatron checkpoint if needed.

    ``tokenizer`` (a folder) is handed to the exporter to save alongside the weights.
    ``verify_checksums=False``: a checkpoint's files are checked for presence and size
    only, not hashed (minutes for a multi-billion-parameter checkpoint); ignored for a
    Hugging Face folder.
    """
    p = Path(path)
    if not p.exists():
        raise SfmError(f"{p}: model path not found")
    if is_hf_folder(p):
        yield p
        return
    if not is_megatron_checkpoint(p):
        raise SfmError(
            f"{p}: neither a Hugging Face folder (no config.json) nor a Megatron checkpoint "
            "(no 'latest' file with iter_* folders)"
        )
    tmp = Path(tempfile.mkdtemp(prefix="sfm-eval-hf-"))
    try:
        out = tmp / "hf"
        _convert_megatron(p, out, tokenizer, verify_checksums)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pick_device_dtype(device: str | None = None, dtype: str | None = None):
    """(torch.device, torch.dtype): cuda + bf16 when a GPU is present, else cpu + fp32."""
    import torch

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise SfmError(f"unknown dtype {dtype!r}; choose from bf16, fp16, fp32")
    return dev, dt


def load_hf_model(folder: str | os.PathLike, device=None, dtype=None, tokenizer_path=None):
    """Load (model, tokenizer) from a Hugging Face folder, eval mode, on ``device``/``dtype``.

    ``tokenizer_path``: load the tokenizer from there instead (for a folder without one).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own rich bar is the progress display
    dev, dt = pick_device_dtype(device, dtype)
    tok_src = folder if tokenizer_path is None else tokenizer_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise SfmError(
            f"{tok_src}: cannot load the tokenizer ({type(exc).__name__}: {exc}); pass --tokenizer DIR"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt)
    except Exception as exc:  # noqa: BLE001 - as above
        raise SfmError(f"{folder}: cannot load the model ({type(exc).__name__}: {exc})") from None
    model.to(dev).eval()
    return model, tokenizer
