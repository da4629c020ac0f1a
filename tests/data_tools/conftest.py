"""Shared fixtures for the data-tools tests: a small corpus and tokenizers trained on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `import data_tools_helpers` in the tests
from data_tools_helpers import make_texts


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    texts = make_texts(1500, seed=1)
    texts[5] = ""  # encodes to no tokens
    texts[9] = "literal <|endoftext|> inside a document"
    return texts


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, corpus_texts):
    from megatron_sfm.data_tools.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("bpe")
    return train_bpe_tokenizer(corpus_texts + make_texts(500, seed=99), 600, out)


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory, corpus_texts):
    from megatron_sfm.data_tools.tokenizer import train_sentencepiece_tokenizer

    out = tmp_path_factory.mktemp("sp")
    return train_sentencepiece_tokenizer(corpus_texts, 400, out)
