"""``sfm data``: filter, tokenize, inspect, train-tokenizer and mix.

Only argument parsing and printing live here; each subcommand imports its library
module when it runs, so ``sfm data filter`` never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_sfm.errors import SfmError


def _console():
    from rich.console import Console

    return Console()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfm data", description="filter, tokenize, inspect and mix training data")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("filter", help="split shards into kept/ and flagged/ with the AI-discourse filter")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="shards (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) or folders")
    p.add_argument("--out", required=True, help="output folder: kept/, flagged/, report.json (must be missing or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, when the run succeeds)")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes (one shard each at a time)")
    p.add_argument("--lists", default=None, help="folder of term lists (default: the shipped lists)")
    p.add_argument("--window", type=int, default=None, help="two-stage rule: max words between entity and negative term")
    p.add_argument("--text-key", default="text", help="document field holding the text")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("tokenize", help="tokenize shards into a Megatron indexed dataset PREFIX.bin/.idx")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, sentencepiece .model, or a folder holding one")
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="output prefix (writes PREFIX.bin, PREFIX.idx and PREFIX.stats.json)")
    p.add_argument("--workers", type=_positive_int, default=1)
    p.add_argument("--text-key", default="text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) lines that are not valid JSON documents")
    p.add_argument("--no-append-eod", action="store_true", help="do not append the EOD token to each document")
    p.add_argument("--backend", choices=("auto", "gigatoken", "tokenizers"), default="auto")
    p.add_argument("--eod-token", default=None, help="end-of-document token (default: the tokenizer's eos token)")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="work unit per worker task, in MiB of input")
    p.add_argument("--writer", choices=("numpy", "megatron"), default="numpy",
                   help="numpy (default): writes the .bin/.idx without importing Megatron-Core or torch; "
                        "megatron: through Megatron-Core's IndexedDatasetBuilder (the same bytes, tested)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("inspect", help="summarise an indexed dataset")
    p.add_argument("prefix", metavar="PREFIX", nargs="+",
                   help="a prefix; several (one source); or a prefixes.json / `sfm launch slurm-data tokenize` folder")
    p.add_argument("--tokenizer", default=None, help="decode the first document with this tokenizer")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("train-tokenizer", help="train a BPE (GPT-NeoX layout) or sentencepiece tokenizer")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="shards, folders or .txt files")
    p.add_argument("--out", required=True, help="output folder (must be missing or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, when training succeeds)")
    p.add_argument("--vocab-size", type=_positive_int, required=True)
    p.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe")
    p.add_argument("--text-key", default="text")

    from megatron_sfm.data_tools.synthesis.cli import add_parser as add_synthesize_parser

    add_synthesize_parser(sub)

    p = sub.add_parser("mix", help="write per-condition blends, phases and manifests from a spec YAML")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="spec overrides, e.g. seed=7")
    p.add_argument("--out", required=True, help="output folder (one subfolder per condition; must be missing or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, when the run succeeds)")
    p.add_argument("--max-epochs", type=float, default=None, help="error when a source repeats more (overrides the spec)")
    return parser


def main(argv: list[str] | None = None) -> int:
    if "numpy" not in sys.modules:
        # The data tools do no linear algebra: without this, numpy's OpenBLAS starts a
        # thread per core at import, which costs tokenize about 0.1 CPU-s per run that
        # its worker processes could use.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    return {"filter": _filter, "tokenize": _tokenize, "inspect": _inspect, "train-tokenizer": _train_tokenizer, "mix": _mix,
            "synthesize": _synthesize}[
        args.command
    ](args)


def _filter(args) -> int:
    from megatron_sfm.data_tools.filter import run_filter, summary_table

    report = run_filter(
        args.inputs, args.out, workers=args.workers, lists_dir=args.lists, window=args.window,
        text_key=args.text_key, progress=not args.no_progress, overwrite=args.overwrite,
    )
    _console().print(summary_table(report))
    return 0


def _tokenize(args) -> int:
    from megatron_sfm.data_tools.tokenize_corpus import summary_table, tokenize_to_indexed

    if args.chunk_mb <= 0:
        raise SfmError("--chunk-mb must be positive")
    summary = tokenize_to_indexed(
        args.inputs, args.tokenizer, args.out, workers=args.workers, text_key=args.text_key,
        skip_bad_lines=args.skip_bad_lines, append_eod=not args.no_append_eod, backend=args.backend,
        eod_token=args.eod_token, chunk_bytes=int(args.chunk_mb * (1 << 20)), progress=not args.no_progress,
        writer=args.writer,
    )
    console = _console()
    console.print(summary_table(summary))
    if summary["bad_lines"]:
        console.print(f"[yellow]skipped {summary['bad_lines']} bad lines, e.g. {', '.join(summary['bad_line_examples'])}")
    return 0


def _inspect(args) -> int:
    from megatron_sfm.data_tools.inspect_multi import inspect_command

    return inspect_command(args)


def _train_tokenizer(args) -> int:
    from megatron_sfm.data_tools.tokenizer import load_tokenizer, train_bpe_tokenizer, train_sentencepiece_tokenizer

    train = train_bpe_tokenizer if args.kind == "bpe" else train_sentencepiece_tokenizer
    from megatron_sfm.utils.io import output_dir

    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        train(args.inputs, args.vocab_size, tmp, text_key=args.text_key)
    tok = load_tokenizer(args.out)
    print(f"wrote {tok.path} ({tok.kind}, vocab size {tok.vocab_size}, eod id {tok.eod_id})")
    return 0


def _mix(args) -> int:
    from megatron_sfm.data_tools.mix import load_spec, summary_table, write_mix

    spec = load_spec(args.spec, max_epochs=args.max_epochs, overrides=args.overrides)
    manifests = write_mix(spec, args.out, overwrite=args.overwrite)
    console = _console()
    console.print(summary_table(manifests))
    for cond, man in manifests.items():
        for w in man["warnings"]:
            console.print(f"[yellow]warning: {cond}: {w}")
    return 0


def _synthesize(args) -> int:
    from megatron_sfm.data_tools.synthesis.cli import run

    return run(args)
