"""``sfm convert``: checkpoints to and from Hugging Face GPTNeoX (docs/conversion.md).

    sfm convert to-hf runs/x/checkpoints --out hf/x [--iteration N] [--dtype fp32|bf16|fp16]
                      [--tokenizer PATH] [--verify] [--no-verify-checksums]
    sfm convert from-hf pythia-160m/ --out runs/y/init --tp 2 --pp 1
"""

from __future__ import annotations

import argparse
import re
import time

from megatron_sfm.errors import SfmError


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB or 1000000")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    return int(number * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfm convert", description="convert checkpoints to and from Hugging Face")
    sub = parser.add_subparsers(dest="command", required=True)

    to = sub.add_parser("to-hf", help="our checkpoint (any TP/PP/DP) -> Hugging Face GPTNeoXForCausalLM folder")
    to.add_argument("ckpt_dir", help="checkpoint folder (with 'latest') or one iter_* folder")
    to.add_argument("--out", required=True, help="Hugging Face folder to write (must be missing or empty)")
    to.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, on success)")
    to.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    to.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of the saved weights")
    to.add_argument("--tokenizer", default=None,
                    help="tokenizer folder or tokenizer.json to save alongside (default: data.tokenizer of "
                         "the checkpoint's config, when it exists)")
    to.add_argument("--verify", action="store_true",
                    help="compare logits of our model and the exported one (fail above the tolerance)")
    to.add_argument("--tolerance", type=float, default=None, help="--verify max |logit diff| (default 1e-4)")
    to.add_argument("--max-shard-size", type=_size, default=None, help="largest safetensors file (default 5GB)")
    to.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false",
                    help="skip the content checksums of the checkpoint's manifest (sizes are still checked)")

    fr = sub.add_parser("from-hf", help="Pythia-style Hugging Face folder -> our checkpoint at a TP/PP layout")
    fr.add_argument("hf_dir", help="Hugging Face GPTNeoX folder (config.json + safetensors or pytorch_model.bin)")
    fr.add_argument("--out", required=True, help="checkpoint folder to create (must be missing or empty)")
    fr.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, on success)")
    fr.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    fr.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    fr.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="dtype of the stored tensors (fp32 keeps fp16/bf16 weights exactly)")
    return parser


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _dir_bytes(path) -> int:
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cmd_to_hf(args) -> int:
    import json

    from megatron_sfm.conversion.exporter import EXPORT_RECORD, export_to_hf

    start = time.perf_counter()
    out = export_to_hf(args.ckpt_dir, args.out, iteration=args.iteration, dtype=args.dtype,
                       tokenizer=args.tokenizer, verify=args.verify, max_shard_bytes=args.max_shard_size,
                       verify_tolerance=args.tolerance, progress=True, overwrite=args.overwrite,
                       verify_checksums=args.verify_checksums)
    elapsed = time.perf_counter() - start
    info = json.loads((out / EXPORT_RECORD).read_text())
    checked = ("yes" if info["checksums_verified"] else
               "no (--no-verify-checksums)" if not args.verify_checksums else "no (the manifest holds sizes only)")
    rows = [("output", str(out)), ("source", info["source"]), ("iteration", str(info["iteration"])),
            ("checksums verified", checked),
            ("dtype", args.dtype), ("padded vocab / tokenizer", f"{info['padded_vocab_size']} / {info['tokenizer_vocab_size']}"),
            ("safetensors files", str(len(list(out.glob("*.safetensors"))))),
            ("size", f"{_dir_bytes(out) / 1e9:.3f} GB"), ("time", f"{elapsed:.1f} s"),
            ("peak RSS (this process)", f"{_peak_rss_gib():.2f} GiB")]
    if args.verify:
        result = json.loads((out / "sfm_verify.json").read_text())
        diff = f"{result['max_abs_logit_diff']:.3g} (tolerance {result['tolerance']:g}) passed"
        rows.append(("verify max |logit diff|", diff))
    _summary("sfm convert to-hf", rows)
    return 0


def cmd_from_hf(args) -> int:
    from megatron_sfm.conversion.importer import import_from_hf

    start = time.perf_counter()
    out = import_from_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite)
    elapsed = time.perf_counter() - start
    _summary("sfm convert from-hf", [
        ("output", str(out)), ("layout", f"TP {args.tp}, PP {args.pp} ({args.tp * args.pp} writer processes)"),
        ("dtype", args.dtype), ("size", f"{_dir_bytes(out) / 1e9:.3f} GB"), ("time", f"{elapsed:.1f} s"),
        ("use with", f"checkpoint.init_from={out}")])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "to-hf":
        return cmd_to_hf(args)
    if args.command == "from-hf":
        return cmd_from_hf(args)
    raise SfmError(f"unknown convert command {args.command!r}")  # pragma: no cover - argparse enforces
