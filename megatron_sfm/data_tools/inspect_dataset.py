"""``sfm data inspect``: what an indexed dataset holds (numpy only, no torch)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def inspect_indexed(prefix: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, max_chars: int = 500) -> dict[str, Any]:
    """Counts, dtype, max token id, document-length percentiles and (with a tokenizer) the first document decoded."""
    from megatron_sfm.data_tools.indexed import read_index

    data = read_index(prefix)
    doc_lengths = np.diff(np.concatenate([[0], np.cumsum(data.sequence_lengths, dtype=np.int64)])[data.document_indices])
    tokens = np.asarray(data.tokens)
    info: dict[str, Any] = {
        "prefix": str(prefix),
        "documents": data.num_documents,
        "sequences": data.num_sequences,
        "tokens": data.num_tokens,
        "dtype": np.dtype(data.dtype).name,
        "max_token_id": int(tokens.max()) if tokens.size else None,
        "empty_documents": int((doc_lengths == 0).sum()),
        "bin_bytes": os.path.getsize(str(prefix) + ".bin"),
        "length_percentiles": {
            f"p{q}": float(np.percentile(doc_lengths, q)) if doc_lengths.size else 0.0 for q in (0, 10, 50, 90, 99, 100)
        },
        "mean_length": float(doc_lengths.mean()) if doc_lengths.size else 0.0,
    }
    if tokenizer_path is not None and data.num_documents:
        from megatron_sfm.data_tools.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        first = data.document(0).tolist()
        info["tokenizer_vocab_size"] = tok.vocab_size
        info["eod_id"] = tok.eod_id
        info["ends_with_eod"] = bool(first and first[-1] == tok.eod_id)
        text = tok.decode(first[:-1] if info["ends_with_eod"] else first)  # the text, without its EOD
        info["first_document"] = text if len(text) <= max_chars else text[:max_chars] + " ..."
        if info["max_token_id"] is not None and info["max_token_id"] >= tok.vocab_size:
            info["warning"] = f"max token id {info['max_token_id']} >= tokenizer vocab size {tok.vocab_size}: wrong tokenizer?"
    return info


def inspect_table(info: dict[str, Any]):
    """A rich Table for :func:`inspect_indexed`'s result."""
    from rich.table import Table

    table = Table(title=f"indexed dataset {info['prefix']}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key in ("documents", "sequences", "tokens", "dtype", "max_token_id", "empty_documents", "bin_bytes", "mean_length"):
        v = info[key]
        table.add_row(key, f"{v:,}" if isinstance(v, int) else (f"{v:.1f}" if isinstance(v, float) else str(v)))
    table.add_row("document length (tokens)", "  ".join(f"{k} {v:.0f}" for k, v in info["length_percentiles"].items()))
    for key in ("tokenizer_vocab_size", "eod_id", "ends_with_eod", "warning", "first_document"):
        if key in info:
            table.add_row(key, str(info[key]))
    return table
