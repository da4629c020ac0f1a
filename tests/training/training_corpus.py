"""Tiny learnable corpora as Megatron indexed datasets, plus blend files (test helpers).

Each source is a set of documents whose tokens follow ``next = (prev + step) mod (V-1) + 1``
with a per-source ``step``: a model learns it in a few hundred steps, and the sources'
losses differ until it has. Token 0 is the end-of-document id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_source(prefix: Path, step: int, num_docs: int = 64, doc_len: int = 200, vocab: int = 512,
                 seed: int = 0) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        start = int(rng.integers(1, vocab))
        doc = (start - 1 + step * np.arange(doc_len)) % (vocab - 1) + 1
        builder.add_document(torch.from_numpy(np.append(doc, 0).astype(np.int64)), [doc_len + 1])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def make_corpus(folder: Path, sources: dict[str, int] | None = None, weights: dict[str, float] | None = None,
                name: str = "blend.json", **kw) -> Path:
    """Write one indexed dataset per source and a blend JSON; returns the blend path."""
    sources = sources or {"web": 1, "aligned": 3}
    weights = weights or {k: 1.0 for k in sources}
    folder.mkdir(parents=True, exist_ok=True)
    train, valid = [], []
    for i, (src, step) in enumerate(sources.items()):
        write_source(folder / "train" / src, step, seed=i, **kw)
        write_source(folder / "valid" / src, step, seed=100 + i, num_docs=16, **{k: v for k, v in kw.items() if k != "num_docs"})
        train += [weights[src], f"train/{src}"]
        valid += [weights[src], f"valid/{src}"]
    blend = folder / name
    blend.write_text(json.dumps({"train": train, "valid": valid, "test": None}))
    return blend
