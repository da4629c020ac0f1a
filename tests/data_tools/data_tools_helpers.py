"""Helpers for the data-tools tests (imported by name; tests/data_tools is on sys.path under pytest)."""

from __future__ import annotations

import json
import random

WORDS = (  # noqa: SIM905
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if more no out so said "
    "what up its about into than them can only other time new some could these two may first then do any "
    "like my now over such our man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state good very "
    "make world still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right used take "
    "three robot kitchen garden river mountain coffee bicycle café naïve Zürich 東京 🙂 data model train "
    "weather recipe bread"
).split()


def make_texts(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        k = rng.randint(1, max_words)
        words = [rng.choice(WORDS) for _ in range(k)]
        sep = rng.choice([" ", " ", " ", "\n", "  ", "\t"])
        text = sep.join(words)
        if i % 17 == 0:
            text = text.capitalize() + "."
        texts.append(text)
    return texts


def write_jsonl(path, docs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


