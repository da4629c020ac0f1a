"""``sfm data inspect`` over a source of several prefixes (numpy only, no torch).

Accepted forms: one prefix (the single-dataset summary of :mod:`inspect_dataset`);
several prefixes; a ``prefixes.json`` (``{"prefixes": [...]}``, as ``sfm launch
slurm-data tokenize`` writes); or that run's folder (holding ``prefixes.json``). Several
prefixes give one row each plus the totals (documents, sequences, tokens, bytes summed;
max token id; document-length percentiles and mean over every document of the source).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from megatron_sfm.errors import SfmError
from megatron_sfm.utils.readers import read_json

PREFIXES_FILE = "prefixes.json"


def expand_prefixes(items: list[str]) -> list[str]:
    """The prefixes named by ``items`` (prefixes, prefixes.json files or slurm-data folders), in order."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and (path / PREFIXES_FILE).is_file():
            path = path / PREFIXES_FILE
        if path.suffix == ".json" and path.is_file():
            data = read_json(path, expect=None)
            prefixes = data.get("prefixes") if isinstance(data, dict) else None
            if not isinstance(prefixes, list) or not prefixes or not all(isinstance(p, str) and p for p in prefixes):
                raise SfmError(f"{path}: expected {{\"prefixes\": [PREFIX, ...]}}")
            out += [p if os.path.isabs(p) else str(path.parent / p) for p in prefixes]
        else:
            out.append(item.removesuffix(".bin").removesuffix(".idx"))
    return out


def inspect_source(prefixes: list[str], tokenizer_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Per-prefix summaries and the totals of a source spread over ``prefixes``."""
    from megatron_sfm.data_tools.indexed import read_index
    from megatron_sfm.data_tools.inspect_dataset import inspect_indexed

    rows = []
    lengths = []
    for i, prefix in enumerate(prefixes):
        info = inspect_indexed(prefix, tokenizer_path if i == 0 else None)
        rows.append(info)
        data = read_index(prefix)
        ends = np.concatenate([[0], np.cumsum(data.sequence_lengths, dtype=np.int64)])[data.document_indices]
        lengths.append(np.diff(ends))
    doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    dtypes = sorted({r["dtype"] for r in rows})
    max_ids = [r["max_token_id"] for r in rows if r["max_token_id"] is not None]
    total: dict[str, Any] = {
        "prefixes": len(prefixes),
        "documents": sum(r["documents"] for r in rows),
        "sequences": sum(r["sequences"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed: " + ", ".join(dtypes),
        "max_token_id": max(max_ids) if max_ids else None,
        "empty_documents": sum(r["empty_documents"] for r in rows),
        "bin_bytes": sum(r["bin_bytes"] for r in rows),
        "length_percentiles": {
            f"p{q}": float(np.percentile(doc_lengths, q)) if doc_lengths.size else 0.0 for q in (0, 10, 50, 90, 99, 100)
        },
        "mean_length": float(doc_lengths.mean()) if doc_lengths.size else 0.0,
    }
    for key in ("tokenizer_vocab_size", "eod_id", "ends_with_eod", "warning", "first_document"):
        if key in rows[0]:
            total[key] = rows[0][key]
    if tokenizer_path is not None and total["max_token_id"] is not None and "tokenizer_vocab_size" in total \
            and total["max_token_id"] >= total["tokenizer_vocab_size"]:
        total["warning"] = (f"max token id {total['max_token_id']} >= tokenizer vocab size "
                            f"{total['tokenizer_vocab_size']}: wrong tokenizer?")
    return {"total": total, "per_prefix": rows}


def source_table(info: dict[str, Any]):
    """A rich Table: one row per prefix, then the totals."""
    from rich.table import Table

    total = info["total"]
    table = Table(title=f"source over {total['prefixes']} prefixes")
    for col in ("prefix", "documents", "tokens", "max id", "mean length", "bin bytes"):
        table.add_column(col, justify="left" if col == "prefix" else "right", overflow="fold")

    def row(name, r, **kw):
        table.add_row(name, f"{r['documents']:,}", f"{r['tokens']:,}", str(r["max_token_id"]),
                      f"{r['mean_length']:.1f}", f"{r['bin_bytes']:,}", **kw)

    for r in info["per_prefix"]:
        row(str(r["prefix"]), r)
    row("total", total, style="bold")
    table.caption = ("document length (tokens): " + "  ".join(f"{k} {v:.0f}" for k, v in total["length_percentiles"].items())
                     + "".join(f"\n{k}: {total[k]}" for k in ("warning", "first_document") if k in total))
    return table


def inspect_command(args) -> int:
    """``sfm data inspect PREFIX... [--tokenizer T] [--json]``."""
    from rich.console import Console

    from megatron_sfm.data_tools.inspect_dataset import inspect_indexed, inspect_table

    items = args.prefix if isinstance(args.prefix, list) else [args.prefix]
    prefixes = expand_prefixes(items)
    multi = len(prefixes) > 1 or any(Path(i).is_dir() or i.endswith(".json") for i in items)
    info = inspect_source(prefixes, args.tokenizer) if multi else inspect_indexed(prefixes[0], args.tokenizer)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        Console().print(source_table(info) if multi else inspect_table(info))
    return 0
