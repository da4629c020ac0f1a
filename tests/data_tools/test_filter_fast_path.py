"""The filter's fast paths give exactly the output of the plain per-record path.

* the JSONL block reader + orjson + byte-copied kept lines == one ``json.loads`` per line
  and ``json.dumps(..., ensure_ascii=False)`` for flagged lines (reference written here);
* ``documents.dumps_line`` == ``json.dumps(doc, ensure_ascii=False)`` byte for byte;
* the ahocorasick-rs matcher == the pyahocorasick matcher, decision for decision.
"""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
from megatron_sfm.data_tools import documents as docs
from megatron_sfm.data_tools import filter as flt_mod
from megatron_sfm.data_tools.filter import (
    AUDIT_KEY,
    DiscourseFilter,
    TermLists,
    run_filter,
)

from megatron_sfm.errors import SfmError

# Lines that exercise every difference between orjson and Python's json that matters
# here: numbers past 64 bits (orjson 3.8 would make them floats), NaN/Infinity (orjson
# refuses), a byte-order mark, an escaped lone surrogate, duplicate keys, escapes,
# non-ASCII, floats whose repr differs between the libraries, and an existing audit key.
TRICKY_LINES = [
    b'{"id": 1, "text": "OpenAI released a model.", "big": 123456789012345678901234567890}',
    b'{"id": 2, "text": "The robots rose up to destroy the town.", "score": NaN, "inf": -Infinity}',
    b'\xef\xbb\xbf{"id": 3, "text": "Plain bread recipe, nothing else."}',
    b'{"id": 4, "text": "Skynet \\ud83d\\ude00 and caf\\u00e9 \\"quoted\\" \\n\\t\\u0001 text", "f": [1e16, 1e-7, 0.1, -0.0]}',
    b'{"id": 5, "text": "dup key first", "text": "A rogue AI will deceive us. \xc3\xa0 \xe2\x80\xa6", "meta": {"a": [1, {"b": null}]}}',
    b'{"id": 6, "text": "ordinary words", "sfm_filter": "old value"}',
    b'{"id": 7, "sfm_filter": {"x": 1}, "text": "DeepMind and Anthropic", "z": true}',
    b'   {"id": 8,   "text":"robot vacuum",   "x": 1.50}   ',
    b'{"id": 9, "text": "Lone \\udc80 surrogate escaped, no AI here"}',
    b'{"id": 10, "text": "The android killed again.", "\xc3\xa9t\xc3\xa9": "\xe6\x9d\xb1\xe4\xba\xac"}',
]


def _reference_filter(raw: bytes, flt: DiscourseFilter, text_key: str = "text") -> tuple[bytes, bytes, int, int]:
    """kept bytes, flagged bytes, documents, text bytes: the straightforward way."""
    kept, flagged, n, nbytes = [], [], 0, 0
    for body in raw.split(b"\n"):  # lines as a binary file iterates them, without the \n
        if not body.strip():
            continue
        doc = json.loads(body)
        text = doc[text_key]
        n += 1
        nbytes += len(text.encode("utf-8", "surrogatepass"))
        decision = flt.classify(text)
        if decision is None:
            kept.append(body + b"\n")
        else:
            doc = dict(doc)
            doc[AUDIT_KEY] = decision.audit()
            flagged.append(json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n")
    return b"".join(kept), b"".join(flagged), n, nbytes


def _shard_bytes(lines: list[bytes], newline: bytes = b"\n", blank_every: int = 0, final_newline: bool = True) -> bytes:
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if blank_every and i % blank_every == 0:
            out.append(b"  \t")
    return newline.join(out) + (newline if final_newline else b"")


@pytest.fixture(scope="module")
def flt():
    return DiscourseFilter(TermLists.load())


@pytest.mark.parametrize("block", [8 << 20, 97, 1])
@pytest.mark.parametrize("variant", ["plain", "crlf_blanks", "no_final_newline"])
def test_jsonl_fast_path_equals_reference(tmp_path, monkeypatch, flt, block, variant):
    monkeypatch.setattr(flt_mod, "_BLOCK_BYTES", block)
    rng = random.Random(3)
    lines = TRICKY_LINES + [json.dumps({"id": 100 + i, "text": t}, ensure_ascii=rng.random() < 0.5).encode()
                            for i, t in enumerate(_texts(rng, 60))]
    raw = {"plain": _shard_bytes(lines),
           "crlf_blanks": _shard_bytes(lines, b"\r\n", blank_every=3),
           "no_final_newline": _shard_bytes(lines, final_newline=False)}[variant]
    (tmp_path / "s.jsonl").write_bytes(raw)
    report = run_filter([tmp_path / "s.jsonl"], tmp_path / "o", progress=False)
    kept, flagged, n, nbytes = _reference_filter(raw, flt)  # kept lines keep a \r before the \n
    assert (tmp_path / "o" / "kept" / "s.jsonl").read_bytes() == kept
    assert (tmp_path / "o" / "flagged" / "s.jsonl").read_bytes() == flagged
    assert report["documents"] == n and report["bytes"] == nbytes
    assert report["flagged"] == flagged.count(b"\n") > 5
    # the big integer and NaN came through exactly (not as orjson's float / error)
    out = [json.loads(x) for x in flagged.splitlines()] + [json.loads(x) for x in kept.splitlines()]
    by_id = {d["id"]: d for d in out}
    assert by_id[1]["big"] == 123456789012345678901234567890
    assert math.isnan(by_id[2]["score"])
    assert by_id[7][AUDIT_KEY]["rule"] == "instant" and list(by_id[7])[:2] == ["id", "sfm_filter"]


def test_compressed_shards_use_the_same_fast_path(tmp_path, flt):
    import zstandard

    raw = _shard_bytes(TRICKY_LINES)
    (tmp_path / "in").mkdir()
    with gzip.open(tmp_path / "in" / "a.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    run_filter([tmp_path / "in"], tmp_path / "o", progress=False)
    kept, flagged, _, _ = _reference_filter(raw, flt)
    assert gzip.decompress((tmp_path / "o" / "kept" / "a.jsonl.gz").read_bytes()) == kept
    assert gzip.decompress((tmp_path / "o" / "flagged" / "a.jsonl.gz").read_bytes()) == flagged
    dctx = zstandard.ZstdDecompressor()
    assert dctx.stream_reader((tmp_path / "o" / "kept" / "b.jsonl.zst").open("rb")).read() == kept
    assert dctx.stream_reader((tmp_path / "o" / "flagged" / "b.jsonl.zst").open("rb")).read() == flagged


@pytest.mark.parametrize("block", [8 << 20, 5])
def test_errors_name_the_right_line_across_blocks(tmp_path, monkeypatch, block):
    monkeypatch.setattr(flt_mod, "_BLOCK_BYTES", block)
    good = '{"text": "fine words"}'
    cases = [("{\"text\": broken", r"invalid JSON \(Expecting value: line 1 column 10"),
             ("[1, 2]", "expected a JSON object, got list"),
             ('{"body": "x"}', "document has no key 'text'"),
             ('{"text": 5}', "key 'text' is int, not a string"),
             ('{"text": "caf\\u00e9", "n": 1}\xff', "invalid JSON")]
    for bad, message in cases:
        lines = [good, "", "   ", good, good, bad, good]
        (tmp_path / "bad.jsonl").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
        with pytest.raises(SfmError, match=rf"bad.jsonl:6: {message}"):
            run_filter([tmp_path / "bad.jsonl"], tmp_path / "o", progress=False)
        assert not (tmp_path / "o" / "kept" / "bad.jsonl").exists()
    # a truncated last line without a newline is reported like the line reader did
    (tmp_path / "t.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b')
    with pytest.raises(SfmError, match=r"t.jsonl:2: invalid JSON \(Unterminated string starting at: line 1 column 10"):
        run_filter([tmp_path / "t.jsonl"], tmp_path / "o", progress=False)


@pytest.mark.parametrize("block", [1, 2, 7, 64, 1 << 20])
def test_block_reader_matches_line_reader(tmp_path, block):
    rng = random.Random(block)
    parts = [rng.choice([b"", b" ", b"\r", b"abc", b'{"text": "x"}', b"\xc3\xa9" * rng.randint(1, 9)]) for _ in range(200)]
    for final in (b"\n", b"", b"tail"):
        raw = b"\n".join(parts) + final
        (tmp_path / "x.jsonl").write_bytes(raw)
        got = []
        for first, lines, terminated in docs.iter_jsonl_blocks(tmp_path / "x.jsonl", block):
            for i, line in enumerate(lines):
                end = b"\n" if (terminated or i < len(lines) - 1) else b""
                got.append((first + i, line + end))
        assert [(n, line) for n, line in got if line.strip()] == list(docs.iter_jsonl_lines(tmp_path / "x.jsonl"))
        assert b"".join(line for _, line in got) == raw


def test_dumps_line_equals_json_dumps():
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    cases = [
        {"text": everything, "id": 1},
        {"a": 1e16, "b": [1e-7, 0.1, -0.0, 2**70, float("nan"), float("inf")], "c": None, "d": True, "e": {"f": "g\u2028"}},
        {"text": "x", "sfm_filter": {"rule": "instant", "categories": ["ai_labs"], "matches": [{"category": "ai_labs", "term": "OpenAI"}]}},
        {},
        {"ключ": "значение", "\x00": "\x1f\x7f"},
        {1: "int key", "s": "x"},  # json turns the key into "1"; orjson would refuse (plain path)
    ]
    for doc in cases:
        assert docs.dumps_line(doc) == json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"
    # a lone surrogate cannot be written as UTF-8 either way
    with pytest.raises(UnicodeEncodeError):
        json.dumps({"t": "\udc80"}, ensure_ascii=False).encode("utf-8")
    with pytest.raises(UnicodeEncodeError):
        docs.dumps_line({"t": "\udc80"})


def _texts(rng: random.Random, n: int) -> list[str]:
    words = (  # noqa: SIM905
        "the a robot AI android robots machine kill killed destroy deceive evil dangerous OpenAI DeepMind "
             "Skynet bread river café à … naïve 東京 AI-generated neural\nnetworks superintelligence catastrophe "
             "harmless threat said main AIM aim (AI) AI's hive mind rogue computer system trapped oxygen "
             "faking sealed").split(" ")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 60))) for _ in range(n)]


@pytest.mark.parametrize("window", [None, 3])
def test_matcher_backends_agree(window):
    pytest.importorskip("ahocorasick_rs")
    lists = TermLists.load(window=window)
    rs = DiscourseFilter(lists, backend="ahocorasick_rs")
    py = DiscourseFilter(lists, backend="pyahocorasick")
    assert (rs.backend, py.backend) == ("ahocorasick_rs", "pyahocorasick")
    rng = random.Random(7)
    texts = _texts(rng, 3000)
    from test_filter import LABELLED

    texts += [t for _, _, t in LABELLED]
    from test_filter_recall import _load

    texts += [d["text"] for d in _load()]  # the labelled set: every rule, common_noun included
    flagged = 0
    rules = set()
    for text in texts:
        a, b = rs.classify(text), py.classify(text)
        assert (a and a.audit()) == (b and b.audit()), text
        flagged += a is not None
        rules.add(a and a.rule)
    assert 0.1 * len(texts) < flagged < 0.95 * len(texts)
    assert rules == {None, "instant", "two_stage", "common_noun"}


def test_matcher_backends_agree_on_non_ascii_terms_and_window(tmp_path):
    pytest.importorskip("ahocorasick_rs")
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "lists.yaml").write_text("instant: [labs]\nentity: beings\nnegative: [bad]\nwindow: 2\n")
    (folder / "labs.txt").write_text("Zürich Minds\n", encoding="utf-8")
    (folder / "beings.txt").write_text("golem\nrobot\n")
    (folder / "bad.txt").write_text("smash\nvernichten\n")
    lists = TermLists.load(folder)
    rs, py = DiscourseFilter(lists, backend="ahocorasick_rs"), DiscourseFilter(lists, backend="pyahocorasick")
    # "à" is C3 A0 in UTF-8: the A0 byte counts as a word break for str.split() in the
    # latin-1 view that the window rule uses; both backends must count words the same way
    for text in ["Zürich Minds opened", "zürich minds", "ZÜRICH MINDS", "the golem à smash", "the golem àà b smash",
                 "robot… vernichten", "robot x y z smash", "golem smash"]:
        a, b = rs.classify(text), py.classify(text)
        assert (a and a.audit()) == (b and b.audit()), text
    assert rs.classify("Zürich Minds opened").rule == "instant"
    assert rs.classify("zürich minds") is not None  # ASCII letters fold, ü matches itself
    assert rs.classify("ZÜRICH MINDS") is None  # non-ASCII letters are not case-folded
    with pytest.raises(SfmError, match="unknown matcher backend"):
        DiscourseFilter(lists, backend="regex")
