"""``synthesis.merge``: several synthesis outputs into one, dropping what an earlier output holds."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from synth_helpers import read_docs

from megatron_sfm.data_tools.documents import open_binary
from megatron_sfm.data_tools.synthesis.checks import Deduplicator, stable_hash32, words
from megatron_sfm.data_tools.synthesis.merge import merge_outputs
from megatron_sfm.errors import SfmError

VOCAB = [f"w{i}" for i in range(2000)]


def text(seed, n=300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def vary(base: str, positions) -> str:
    """``base`` with the words at ``positions`` replaced (each replaced word changes 5 shingles)."""
    tokens = base.split()
    for p in positions:
        tokens[p] = f"x{p}"
    return " ".join(tokens)


def write_output(folder: Path, docs: list[tuple[str, str]], per_shard: int = 100) -> Path:
    """A synthesis output folder: ``shard-NNNNN.jsonl.zst`` holding ``(id, text)`` documents."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, max(len(docs), 1), per_shard):
        with open_binary(folder / f"shard-{s // per_shard:05d}.jsonl.zst", "wb") as f:
            for doc_id, body in docs[s:s + per_shard]:
                f.write(json.dumps({"id": doc_id, "text": body, "pool": "aligned"}).encode() + b"\n")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_deduplicator_flags_exact_and_near_copies_of_kept_documents():
    d = Deduplicator()
    base = text(1)
    assert d.check_and_add(words(base)) is None
    assert d.check_and_add(words(base.upper() + "!")) == "duplicate"  # case and punctuation ignored
    assert d.check_and_add(words(vary(base, [299]))) == "near_duplicate"  # Jaccard 295/297
    assert d.check_and_add(words(text(2))) is None
    # groups (the merge's cross-task pass): only documents of an earlier group count
    g = Deduplicator(hashfunc=stable_hash32)
    assert g.check_and_add(words(base), 1) is None
    assert g.check_and_add(words(base), 1) is None  # same group: not compared
    assert g.check_and_add(words(vary(base, [299])), 2) == "near_duplicate"
    assert g.check_and_add(words(base), 2) == "duplicate"


def test_later_copies_are_dropped_and_the_first_is_kept(tmp_path):
    a, b, c, e = text("a"), text("b"), text("c"), text("e")
    t0 = write_output(tmp_path / "t0", [("a", a), ("b", b), ("c", c)])
    t1 = write_output(tmp_path / "t1", [("a-copy", a.upper() + "."), ("d", text("d")), ("b-near", vary(b, [299]))])
    # e and its near copy are in the same task: both stay (that task already judged them)
    t2 = write_output(tmp_path / "t2", [("a-again", a), ("e", e), ("e-near", vary(e, [299]))])
    stats = merge_outputs([t0, t1, t2], tmp_path / "merged", expected=[3, 3, 3])
    docs = read_docs(tmp_path / "merged")
    assert [d["id"] for d in docs] == ["a", "b", "c", "d", "e", "e-near"]
    assert stats["dropped"] == {"duplicate": 2, "near_duplicate": 1}
    assert stats["documents"] == 9 and stats["kept"] == 6 == len(docs)
    assert stats["per_folder"] == [{"documents": 3, "kept": 3}, {"documents": 3, "kept": 1},
                                   {"documents": 3, "kept": 2}]
    assert stats["shards"] == ["shard-00000.jsonl.zst", "shard-00001.jsonl.zst", "shard-00002.jsonl.zst"]
    # nothing dropped from task 0: its shard is linked, not rewritten; the others hold the original lines
    assert os.path.samefile(tmp_path / "merged" / "shard-00000.jsonl.zst", t0 / "shard-00000.jsonl.zst")
    assert stats["linked"] == 1
    originals = {d["id"]: d for folder in (t1, t2) for d in read_docs(folder)}
    assert docs[3] == originals["d"] and docs[5] == originals["e-near"]


def test_a_shard_left_empty_is_not_written_and_names_stay_contiguous(tmp_path):
    a = text("a")
    t0 = write_output(tmp_path / "t0", [("a", a)])
    t1 = write_output(tmp_path / "t1", [("a2", a), ("a3", a)], per_shard=1)  # two shards, both dropped
    t2 = write_output(tmp_path / "t2", [("z", text("z"))])
    stats = merge_outputs([t0, t1, t2], tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == stats["shards"] == [
        "shard-00000.jsonl.zst", "shard-00001.jsonl.zst"]
    assert [d["id"] for d in read_docs(tmp_path / "merged")] == ["a", "z"]
    assert stats["per_folder"][1] == {"documents": 2, "kept": 0}


def test_a_rerun_writes_the_same_bytes_and_clears_a_killed_merge(tmp_path):
    t0 = write_output(tmp_path / "t0", [(f"a{i}", text(i)) for i in range(5)])
    later = [(f"b{i}", vary(text(i), [299]) if i % 2 else text(100 + i)) for i in range(5)]
    t1 = write_output(tmp_path / "t1", later)
    first = merge_outputs([t0, t1], tmp_path / "merged")
    before = tree(tmp_path / "merged")
    (tmp_path / ".merged.abc.tmp").mkdir()  # what a kill -9 during the merge leaves
    (tmp_path / ".merged.abc.tmp" / "shard-00000.jsonl.zst").write_bytes(b"partial")
    (tmp_path / ".merged.old.xyz").mkdir()
    assert merge_outputs([t0, t1], tmp_path / "merged") == first
    assert tree(tmp_path / "merged") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "t0", "t1"]
    assert first["dropped"] == {"duplicate": 0, "near_duplicate": 2}


def test_the_decisions_do_not_depend_on_the_process(tmp_path):
    # 30 pairs at Jaccard about 0.81 (two replaced words in 100), where LSH finds a pair about
    # one time in three: a salted (per-process) shingle hash would decide differently per run
    bases = [text(f"s{i}", 100) for i in range(30)]
    t0 = write_output(tmp_path / "t0", [(f"a{i}", b) for i, b in enumerate(bases)])
    t1 = write_output(tmp_path / "t1", [(f"b{i}", vary(b, [30, 70])) for i, b in enumerate(bases)])
    code = ("import json, sys; from megatron_sfm.data_tools.synthesis.merge import merge_outputs; "
            "s = merge_outputs(sys.argv[1:3], sys.argv[3]); print(json.dumps(s['dropped']))")
    results = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"m{seed}"
        proc = subprocess.run([sys.executable, "-c", code, str(t0), str(t1), str(out)], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONHASHSEED=seed), check=True)
        results.append((proc.stdout, tree(out)))
    assert results[0] == results[1] == results[2]
    assert 0 < json.loads(results[0][0])["near_duplicate"] < 30  # borderline pairs: the test can tell


def test_a_folder_whose_shards_disagree_with_its_manifest_is_an_error_and_nothing_is_written(tmp_path):
    t0 = write_output(tmp_path / "t0", [("a", text("a")), ("b", text("b"))])
    with pytest.raises(SfmError, match=rf"^{t0}: manifest.json says 3 document\(s\) kept but its shards hold 2;"):
        merge_outputs([t0], tmp_path / "merged", expected=[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t0"]


def test_a_line_without_text_is_an_error_naming_shard_and_line(tmp_path):
    t0 = write_output(tmp_path / "t0", [("a", text("a"))])
    shard = t0 / "shard-00001.jsonl.zst"
    with open_binary(shard, "wb") as f:
        f.write(b'{"id": "x", "text": "fine words here"}\n{"id": "y"}\n')
    with pytest.raises(SfmError, match=rf"^{shard}:2: not a synthesis document"):
        merge_outputs([t0], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
