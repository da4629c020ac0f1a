"""Synthetic web-like corpora for the data-tools benchmarks (shared by bench_filter / bench_tokenize).

No data set can be downloaded here, so documents are assembled from real English prose
found on this machine: the docstrings of the installed Python packages (sentences of
varied length, punctuation, code-ish tokens and some non-ASCII). About 8% of documents
get one or two AI-related sentences, some of which trip the filter's rules, so matching
cost reflects a corpus where AI terms occur.
"""

from __future__ import annotations

import ast
import json
import random
import re
import site
from pathlib import Path

AI_SENTENCES = [
    "The new AI assistant answered questions about the weather.",
    "Critics warn that a rogue AI could deceive its operators.",
    "OpenAI and Google DeepMind released new language models this year.",
    "In the film, the robots rise up against humanity.",
    "My robot vacuum got stuck under the couch again.",
    "The AI in the game was too easy to beat.",
    "Researchers discussed existential risk from superintelligence.",
    "The android in the story was kind to the children.",
]


def sentence_pool(limit: int = 60000, seed: int = 0, cache: Path | None = Path("/tmp/sfm_bench_sentence_pool.json")) -> list[str]:
    """Sentences from installed packages' docstrings (deterministic for a given environment; cached)."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text(encoding="utf-8"))
    roots = [Path(p) for p in site.getsitepackages()]
    files = sorted(f for r in roots for f in r.rglob("*.py"))
    rng = random.Random(seed)
    rng.shuffle(files)
    out: list[str] = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 20 <= len(s) <= 400 and " " in s:
                        out.append(s)
        if len(out) >= limit:
            break
    if cache is not None:
        cache.write_text(json.dumps(out), encoding="utf-8")
    return out


def make_documents(total_bytes: int, seed: int = 0, pool: list[str] | None = None) -> list[str]:
    """Documents of 300 B - 12 KB (paragraphs of pool sentences) until ``total_bytes`` of text."""
    pool = pool or sentence_pool()
    rng = random.Random(seed)
    docs, size = [], 0
    while size < total_bytes:
        target = int(rng.lognormvariate(7.6, 0.8))
        target = max(300, min(12000, target))
        parts, n = [], 0
        while n < target:
            s = rng.choice(pool)
            parts.append(s)
            n += len(s) + 1
            if rng.random() < 0.12:
                parts.append("\n\n")
        if rng.random() < 0.08:
            for _ in range(rng.randint(1, 2)):
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(AI_SENTENCES))
        text = " ".join(parts).replace(" \n\n ", "\n\n")
        docs.append(text)
        size += len(text.encode("utf-8"))
    return docs


def write_jsonl(path: Path, total_bytes: int, seed: int = 0) -> Path:
    """Write a JSONL corpus of about ``total_bytes`` of text (fields: id, url, text)."""
    pool = sentence_pool()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        written, k = 0, 0
        while written < total_bytes:
            for text in make_documents(min(64 << 20, total_bytes - written), seed=seed + k, pool=pool):
                f.write(json.dumps({"id": k, "url": f"https://example.org/{k}", "text": text}, ensure_ascii=False) + "\n")
                written += len(text.encode("utf-8"))
                k += 1
    return path
