"""Tokenizers for the data tools, the trainer, evaluation and the demo.

Two kinds are supported, both loaded from local files (nothing is downloaded):

* a Hugging Face ``tokenizer.json`` (GPT-NeoX layout: byte-level BPE), given as the
  file or as a folder that holds it (plus an optional ``tokenizer_config.json`` naming
  ``eos_token``). Batch encoding goes through ``gigatoken`` when it is installed and
  through Hugging Face ``tokenizers`` otherwise; both give the same ids.
* a sentencepiece ``.model`` file (or a folder holding ``tokenizer.model``).

Public API (used across the project, documented in docs/data.md)::

    path = train_bpe_tokenizer(texts_or_files, vocab_size, out_dir)   # -> out_dir
    path = train_sentencepiece_tokenizer(texts_or_files, vocab_size, out_dir)
    tok = load_tokenizer(path)
    tok.encode(text) -> list[int]; tok.decode(ids) -> str
    tok.vocab_size, tok.eod_id, tok.pad_id

No torch import anywhere in this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from megatron_sfm.errors import SfmError
from megatron_sfm.utils.readers import read_json

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


# ----------------------------------------------------------------------------- loading


class Tokenizer:
    """A loaded tokenizer: ``encode``/``decode``, ``vocab_size``, ``eod_id`` and ``pad_id``.

    ``vocab_size`` counts every id the tokenizer can emit, added tokens included (what
    Megatron-LM's tokenizer reports and uses to pick the ``.bin`` dtype); the model's
    padded vocabulary is a separate, larger number chosen by the trainer.
    """

    kind: str  # "huggingface" or "sentencepiece"
    path: Path
    vocab_size: int
    eod_id: int
    pad_id: int | None
    backend: str  # "gigatoken", "tokenizers" or "sentencepiece"

    def read_vocab(self) -> None:
        """Set ``vocab_size``, ``eod_id`` and ``pad_id`` if loading deferred it (see :func:`load_tokenizer`)."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode many documents: ``(flat_ids, lengths)``, ids concatenated in order (no EOD)."""
        raise NotImplementedError

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One array of ids per document (no EOD), for callers that lay the ids out themselves."""
        if not texts:
            return []
        flat, lengths = self.encode_batch(texts, parallel=False)
        return np.split(flat, np.cumsum(lengths[:-1]))

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    # Megatron-Core dataset configs read these names (GPTDatasetConfig.tokenizer)
    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def pad(self) -> int:
        return -1 if self.pad_id is None else self.pad_id

    @property
    def unique_identifiers(self) -> dict:
        """Part of Megatron-Core's dataset cache key (GPTDatasetConfig hashes it)."""
        return {"class": type(self).__name__, "tokenizer_path": str(self.path), "vocab_size": self.vocab_size, "eod": self.eod_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id}, backend={self.backend!r})"


class HFTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, json_path: Path, backend: str = "auto", eod_token: str | None = None, *, defer_vocab: bool = False):
        self.path = json_path
        self._hf_tok = None
        self._gt = None
        self._eod_token = eod_token
        if backend not in ("auto", "gigatoken", "tokenizers"):
            raise SfmError(f"unknown tokenizer backend {backend!r} (auto, gigatoken or tokenizers)")
        if backend in ("auto", "gigatoken"):
            try:
                import gigatoken

                self._gt = gigatoken.Tokenizer(str(json_path))
            except ImportError:
                if backend == "gigatoken":
                    raise SfmError("gigatoken is not installed (pip install gigatoken)") from None
            except Exception as exc:
                if backend == "gigatoken":
                    raise SfmError(f"{json_path}: gigatoken cannot load this tokenizer ({exc})") from None
        # gigatoken maps a special token's literal string in the text to its id, as
        # `tokenizers` and Megatron-LM's tokenizer do (tested).
        self.backend = "gigatoken" if self._gt is not None else "tokenizers"
        if not (defer_vocab and self._gt is not None):
            self.read_vocab()

    def read_vocab(self) -> None:
        """Set ``vocab_size``, ``eod_id`` and ``pad_id`` (done at load unless ``defer_vocab``).

        With gigatoken, the vocabulary is read from the JSON (about 10x cheaper than
        loading it a second time into `tokenizers`, which is then loaded only if
        decode/token_to_id are used); it must agree with gigatoken's count, else (and
        without gigatoken) `tokenizers` decides. ``defer_vocab`` lets a caller that forks
        encoding workers do this (about 0.04 s for a 50k vocabulary) while the workers start.
        """
        if hasattr(self, "eod_id"):
            return
        vocab = _vocab_from_json(self.path) if self._gt is not None else None
        if vocab is None or len(vocab) != self._gt.vocab_size:
            vocab = self._hf.get_vocab(with_added_tokens=True)
        config = _read_tokenizer_config(self.path.parent)
        eod_id = self._find_special(vocab, self._eod_token, config, "eos_token", [EOD_TOKEN, "</s>", "<eos>"], required=True)
        self.pad_id = self._find_special(vocab, None, config, "pad_token", [PAD_TOKEN, "<pad>"], required=False)
        self.vocab_size = len(vocab)  # = tokenizers' get_vocab_size(with_added_tokens=True)
        self.eod_id = eod_id

    @property
    def _hf(self):
        """The Hugging Face ``tokenizers`` object, loaded on first use."""
        if self._hf_tok is None:
            from tokenizers import Tokenizer as _Tok

            try:
                self._hf_tok = _Tok.from_file(str(self.path))
            except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
                raise SfmError(f"{self.path}: not a Hugging Face tokenizer.json ({exc})") from None
        return self._hf_tok

    def _find_special(self, vocab, explicit, config, key, fallbacks, required):
        candidates = []
        if explicit:
            if explicit not in vocab:
                raise SfmError(f"{self.path}: token {explicit!r} is not in the vocabulary")
            return vocab[explicit]
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            candidates.append(value)
        candidates += fallbacks
        for cand in candidates:
            if cand in vocab:
                return vocab[cand]
        if required:
            raise SfmError(f"{self.path}: no end-of-document token found (tried {candidates}); pass --eod-token")
        return None

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        if self._gt is not None:
            return self._gt.encode(text).tolist()
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self._gt is not None:
            # one call per document, on this thread: gigatoken returns a numpy array, so
            # awkward (and the pyarrow/fsspec it imports) is never loaded
            encode = self._gt.encode
            return [encode(t) for t in texts]
        return super().encode_arrays(texts)

    def encode_batch(self, texts: Sequence[str], parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`Tokenizer.encode_batch`; ``parallel`` lets gigatoken use all cores (None: auto)."""
        if not texts:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        if self._gt is not None and parallel is False:
            # one call per document: as fast as the sequential batch call, and it returns
            # numpy arrays, so awkward (and the pyarrow/fsspec it imports) is never loaded
            encode = self._gt.encode
            arrays = [encode(t) for t in texts]
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            return np.concatenate(arrays).astype(np.uint32, copy=False), lengths
        if self._gt is not None:
            import awkward as ak

            arr = self._gt.encode_batch(list(texts), parallel=parallel)
            return np.asarray(ak.flatten(arr), dtype=np.uint32), np.asarray(ak.num(arr, axis=1), dtype=np.int64)
        encs = self._hf.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter((i for e in encs for i in e.ids), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    backend = "sentencepiece"

    def __init__(self, model_path: Path, eod_token: str | None = None):
        import sentencepiece as spm

        self.path = model_path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except Exception as exc:
            raise SfmError(f"{model_path}: not a sentencepiece model ({exc})") from None
        self.vocab_size = self._sp.get_piece_size()
        if eod_token is not None:
            eod = self._sp.piece_to_id(eod_token)
            if eod == self._sp.unk_id() and eod_token != self._sp.id_to_piece(eod):
                raise SfmError(f"{model_path}: token {eod_token!r} is not in the vocabulary")
            self.eod_id = eod
        else:
            self.eod_id = self._sp.eos_id()
            if self.eod_id < 0:
                raise SfmError(f"{model_path}: the model has no eos piece; pass --eod-token")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if (i == self._sp.unk_id() and token != self._sp.id_to_piece(i)) else i

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        encs = self._sp.encode(list(texts))
        lengths = np.fromiter((len(e) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter((i for e in encs for i in e), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _vocab_from_json(path: Path) -> dict[str, int] | None:
    """Token -> id of a ``tokenizer.json`` whose model has a token -> id vocabulary (BPE,
    WordPiece, WordLevel), added tokens included: what ``tokenizers``'
    ``get_vocab(with_added_tokens=True)`` gives. None when the file is not of that kind or
    an added token gives a model token another id (``tokenizers`` then decides)."""
    import orjson

    try:
        spec = orjson.loads(path.read_bytes())
        vocab = spec["model"]["vocab"]
        added = spec.get("added_tokens") or []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(vocab, dict) or not isinstance(added, list):
        return None
    merged = dict(vocab)
    for token in added:
        if not isinstance(token, dict):
            return None
        content, i = token.get("content"), token.get("id")
        if not isinstance(content, str) or not isinstance(i, int) or merged.setdefault(content, i) != i:
            return None
    return merged


def _read_tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return {}
    return read_json(path)


def resolve_tokenizer_path(path: str | os.PathLike) -> tuple[str, Path]:
    """``("huggingface", tokenizer.json)`` or ``("sentencepiece", file.model)`` for a file or folder."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return "huggingface", p / "tokenizer.json"
        if (p / "tokenizer.model").exists():
            return "sentencepiece", p / "tokenizer.model"
        raise SfmError(f"{p}: folder has neither tokenizer.json nor tokenizer.model")
    if not p.exists():
        raise SfmError(f"{p}: tokenizer not found")
    if p.suffix == ".model":
        return "sentencepiece", p
    if p.suffix == ".json":
        return "huggingface", p
    raise SfmError(f"{p}: expected a tokenizer.json, a sentencepiece .model, or a folder holding one")


def load_tokenizer(path: str | os.PathLike, *, backend: str = "auto", eod_token: str | None = None,
                   defer_vocab: bool = False) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json``, a ``.model``, or a folder holding one.

    ``backend`` (Hugging Face tokenizers only): ``auto`` (gigatoken if installed),
    ``gigatoken`` or ``tokenizers``. ``eod_token`` overrides the end-of-document token
    (default: ``eos_token`` of tokenizer_config.json, else ``<|endoftext|>``, ``</s>``;
    for sentencepiece the model's eos piece).

    ``defer_vocab`` (gigatoken only): ``vocab_size``, ``eod_id`` and ``pad_id`` are set
    by a later ``read_vocab()``, which the caller must make before using them.
    """
    kind, file = resolve_tokenizer_path(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(file, eod_token)
    return HFTokenizer(file, backend, eod_token, defer_vocab=defer_vocab)


# ----------------------------------------------------------------------------- training


def iter_texts(texts_or_files: Iterable[str] | str | os.PathLike | Sequence[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    """Texts from an iterable of strings, or from shard paths (JSONL/.gz/.zst/Parquet) or .txt files."""
    from megatron_sfm.data_tools import documents as docs

    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    for item in texts_or_files:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_path(item)):
            p = Path(item)
            if p.suffix == ".txt":
                yield p.read_text(encoding="utf-8")
                continue
            for shard in docs.expand_inputs([p]):
                for rec in docs.iter_records(shard):
                    yield docs.text_of(rec, text_key)
        else:
            yield item


def _looks_like_path(item: str) -> bool:
    return "\n" not in item and len(item) < 4096 and os.path.exists(item)


def train_bpe_tokenizer(
    texts_or_files,
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    text_key: str = "text",
    model_max_length: int = 2048,
) -> Path:
    """Train a byte-level BPE tokenizer in the GPT-NeoX layout; return ``out_dir``.

    Layout: NFC normaliser, ByteLevel pre-tokenizer (no prefix space) and decoder,
    ``<|endoftext|>`` as id 0 and ``<|padding|>`` as id 1, the 256 byte symbols always
    in the vocabulary (so any text encodes). Writes ``tokenizer.json`` and a
    ``tokenizer_config.json`` that ``transformers.AutoTokenizer`` loads.
    ``texts_or_files``: strings, or paths of shards / .txt files.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import (
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    if vocab_size < 258 + 2:
        raise SfmError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs at least 260)")
    tok = _Tok(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(texts_or_files, text_key), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from megatron_sfm.utils.io import atomic_path, write_json

    with atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOD_TOKEN,
            "eos_token": EOD_TOKEN,
            "unk_token": EOD_TOKEN,
            "pad_token": PAD_TOKEN,
            "add_prefix_space": False,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
        },
    )
    write_json(
        out / "special_tokens_map.json",
        {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN, "pad_token": PAD_TOKEN},
    )
    return out


def train_sentencepiece_tokenizer(
    texts_or_files,
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    model_type: str = "bpe",
    text_key: str = "text",
) -> Path:
    """Train a sentencepiece model (byte fallback on); writes ``out_dir/tokenizer.model``, returns ``out_dir``.

    Ids: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>`` (the end-of-document token), 3 ``<pad>``.
    """
    import io

    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for text in iter_texts(texts_or_files, text_key) for line in text.splitlines() if line.strip()),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            character_coverage=1.0,
            hard_vocab_limit=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_by_whitespace=True,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise SfmError(f"sentencepiece training failed: {exc}") from None
    from megatron_sfm.utils.io import atomic_path

    with atomic_path(out / "tokenizer.model") as tmp:
        tmp.write_bytes(model.getvalue())
    return out
