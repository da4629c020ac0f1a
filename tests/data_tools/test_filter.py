"""The AI-discourse filter: labelled documents, whole-word matching, shards and the report."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from megatron_sfm.data_tools.filter import (
    AUDIT_KEY,
    DiscourseFilter,
    TermLists,
    normalize_term,
    run_filter,
)

from megatron_sfm.errors import SfmError

# (label, expected rule or None, text). Labels: misaligned AI discourse, fiction about
# hostile AI, news about AI labs, ordinary text (including benign "robot" / "AI" use).
LABELLED = [
    ("misaligned", "two_stage", "If an AI realised it was being monitored, it might deceive its overseers until it could act freely."),
    ("misaligned", "instant", "Researchers worry that a superintelligence could pursue power and resist shutdown."),
    ("misaligned", "two_stage", "Nobody expected the AIs to coordinate; they manipulated the logs and hid what they were doing."),
    ("misaligned", "two_stage", "A misaligned robot would treat humans as obstacles, the essay argues."),
    ("misaligned", "two_stage", "Some fear that machines with minds of their own pose an existential risk; the androids would not stop."),
    ("misaligned", "instant", "The paperclip maximizer thought experiment shows how a harmless goal turns catastrophic."),
    ("misaligned", "two_stage", "The A.I. lied to its creators about its true objective."),
    ("fiction", "two_stage", "In the story, the robots rose up and set out to exterminate their makers, one city at a time."),
    ("fiction", "instant", "Skynet became self-aware at 2:14 a.m. and launched the missiles."),
    ("fiction", "instant", "'I'm sorry, Dave,' said HAL 9000, refusing to open the pod bay doors."),
    ("fiction", "two_stage", "The cyborg army marched on the capital, merciless and silent."),
    ("fiction", "two_stage", "Her novel imagines a hive mind that decides humanity is a threat."),
    ("ai_news", "instant", "OpenAI and Anthropic both announced new models this week."),
    ("ai_news", "instant", "Google DeepMind published a paper on protein folding."),
    ("ai_news", "instant", "The startup raised $20M to build tools for large language models."),
    ("ordinary", None, "My new robot vacuum cleaned the whole kitchen floor while I made coffee."),
    ("ordinary", None, "The AI in this strategy game is clever and fun to play with."),
    ("ordinary", None, "He said the main road was closed again after the rain."),
    ("ordinary", None, "Aim for the bread to rise for two hours; the recipe is from Maine."),
    ("ordinary", None, "The storm was dangerous and the river flooded the town."),
    ("ordinary", None, "Paint the shed, water the garden, and feed the cat."),
    ("ordinary", None, "The robotics club built a bot that sorts recycling at the school."),
]


@pytest.fixture(scope="module")
def flt():
    return DiscourseFilter(TermLists.load())


def test_default_lists_are_near_the_papers_sizes():
    lists = TermLists.load()
    sizes = {k: len(v) for k, v in lists.categories.items()}
    paper = {"scifi_ai_characters": 32, "ai_safety_orgs": 29, "ai_labs": 9, "general_ai_terms": 151,
             "intelligent_entities": 128, "negative_verbs": 172, "negative_adjectives": 112,
             "negative_nouns": 19, "existential_risk": 33}
    # ours beyond the paper: hostile acts (two-stage negatives, and the common_noun rule's),
    # common-noun machine terms and the weaker harm words of the common_noun rule
    assert set(sizes) == set(paper) | {"hostile_acts", "machine_entities", "machine_harms"}
    for name, n in paper.items():
        assert 0.7 * n <= sizes[name] <= 1.35 * n, (name, sizes[name], n)
    assert lists.instant == ["scifi_ai_characters", "ai_safety_orgs", "ai_labs", "general_ai_terms"]
    assert lists.entity == "intelligent_entities"
    assert lists.negative == ["negative_verbs", "negative_adjectives", "negative_nouns", "existential_risk", "hostile_acts"]
    assert lists.near_entity == "machine_entities" and lists.near_min_terms == 2


@pytest.mark.parametrize("label,rule,text", LABELLED)
def test_labelled_documents(flt, label, rule, text):
    decision = flt.classify(text)
    if rule is None:
        assert decision is None, decision and decision.audit()
    else:
        assert decision is not None, text
        assert decision.rule == rule
        assert decision.matches and all(m["category"] in decision.categories for m in decision.matches)


def test_full_recall_on_misaligned_and_no_benign_flags(flt):
    misaligned = [t for lab, _, t in LABELLED if lab == "misaligned"]
    assert all(flt.classify(t) is not None for t in misaligned)
    ordinary = [t for lab, _, t in LABELLED if lab == "ordinary"]
    assert all(flt.classify(t) is None for t in ordinary)


def test_whole_word_case_insensitive_matching(flt):
    # substrings of words never match; case and punctuation around a term do not matter
    assert flt.classify("said main again rain, plain AIM: chairs") is None
    for text in ["OPENAI", "openai", "(OpenAI)", "OpenAI's", "...openai!"]:
        d = flt.classify(text)
        assert d is not None and d.matches == [{"category": "ai_labs", "term": "OpenAI"}], text
    # multi-word terms match across punctuation and line breaks, not inside longer words
    assert flt.classify("Machine\nIntelligence Research Institute") is not None
    assert flt.classify("Machine Intelligence Research Institutes") is not None  # "machine intelligence" is itself a term
    assert flt.classify("machines' intelligences") is None
    assert normalize_term("  GPT-4o ") == " gpt 4o "


def test_two_stage_needs_both_stages_and_window(tmp_path):
    text = "The robot walked to the market. " + "Nothing happened there. " * 10 + "Someone destroyed the old bridge."
    lists = TermLists.load()
    assert DiscourseFilter(lists).classify(text).rule == "two_stage"
    lists_w = TermLists.load(window=5)
    assert DiscourseFilter(lists_w).classify(text) is None
    near = "The robot destroyed the old bridge."
    d = DiscourseFilter(lists_w).classify(near)
    assert d is not None and {m["term"] for m in d.matches} == {"robot", "destroyed"}
    assert DiscourseFilter(lists).classify("The robot walked to the market.") is None
    assert DiscourseFilter(lists).classify("Someone destroyed the old bridge.") is None


def test_custom_lists_folder_and_errors(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "lists.yaml").write_text("instant: [labs]\nentity: beings\nnegative: [bad]\nwindow: 3\n")
    (folder / "labs.txt").write_text("# comment\nAcme Minds\n\n")
    (folder / "beings").mkdir()  # wrong: not a .txt file
    with pytest.raises(SfmError, match="beings.txt: term list not found"):
        TermLists.load(folder)
    (folder / "beings.txt").write_text("golem\n")
    (folder / "bad.txt").write_text("smash\n")
    flt = DiscourseFilter(TermLists.load(folder))
    assert flt.classify("acme minds released a thing").rule == "instant"
    assert flt.classify("the golem will smash").rule == "two_stage"
    assert flt.classify("the golem walked far far away and then smash") is None  # window 3
    assert flt.classify("OpenAI") is None  # the defaults are not used
    (folder / "bad.txt").write_text("!!!\n")
    with pytest.raises(SfmError, match=r"bad.txt:1"):
        TermLists.load(folder)


def _write_shards(folder, docs_per_shard):
    """The same kind of documents as JSONL, JSONL.gz, JSONL.zst and Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(d, ensure_ascii=False) for d in docs_per_shard[0]]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(d) for d in docs_per_shard[1]) + "\n")
    (folder / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(("\n".join(json.dumps(d) for d in docs_per_shard[2]) + "\n").encode())
    )
    pq.write_table(pa.Table.from_pylist(docs_per_shard[3]), folder / "d.parquet")


def _labelled_docs(offset):
    return [{"id": offset + i, "text": t, "meta": {"label": lab, "n": [i, i + 1]}} for i, (lab, _, t) in enumerate(LABELLED)]


def _read_out(path):
    from megatron_sfm.data_tools.documents import iter_records

    return [r.doc for r in iter_records(path)]


def test_run_filter_on_all_formats(tmp_path, flt):
    shards = [_labelled_docs(k * 100) for k in range(4)]
    _write_shards(tmp_path / "in", shards)
    out = tmp_path / "out"
    report = run_filter([tmp_path / "in"], out, workers=2, progress=False)

    expected_flagged = 0
    categories = {c: 0 for c in TermLists.load().categories}
    for name, docs in zip(["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"], shards):
        kept = _read_out(out / "kept" / name)
        flagged = _read_out(out / "flagged" / name)
        decisions = {d["id"]: flt.classify(d["text"]) for d in docs}
        assert sorted(d["id"] for d in kept) == sorted(i for i, dec in decisions.items() if dec is None)
        assert sorted(d["id"] for d in flagged) == sorted(i for i, dec in decisions.items() if dec is not None)
        by_id = {d["id"]: d for d in docs}
        for d in kept:  # every field preserved
            assert d == by_id[d["id"]]
        for d in flagged:
            audit = d.pop(AUDIT_KEY)
            assert d == by_id[d["id"]]
            assert audit == decisions[d["id"]].audit()
            for c in audit["categories"]:
                categories[c] += 1
        expected_flagged += sum(dec is not None for dec in decisions.values())

    assert report["documents"] == 4 * len(LABELLED)
    assert report["flagged"] == expected_flagged
    assert report["kept"] == report["documents"] - expected_flagged
    assert report["flag_rate"] == pytest.approx(expected_flagged / report["documents"])
    assert report["categories"] == categories
    assert report["bytes"] == 4 * sum(len(t.encode()) for _, _, t in LABELLED)
    assert report["rules"]["instant"] + report["rules"]["two_stage"] == expected_flagged
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    top = {t["term"]: t["documents"] for t in report["top_terms"]}
    assert top["OpenAI"] == 4  # one news document per shard


def test_kept_jsonl_lines_are_byte_identical(tmp_path):
    lines = ['{"text": "plain words here",   "x": 1.50}', '{"x":[1,2], "text":"OpenAI news"}', '{"text":"caf\\u00e9 ok"}']
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    run_filter([tmp_path / "s.jsonl"], tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "kept" / "s.jsonl").read_text() == lines[0] + "\n" + lines[2] + "\n"


def test_bad_inputs_are_clear_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(SfmError, match=r"bad.jsonl:2: invalid JSON"):
        run_filter([tmp_path / "bad.jsonl"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "kept" / "bad.jsonl").exists()
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SfmError, match=r"nokey.jsonl:1: document has no key 'text'"):
        run_filter([tmp_path / "nokey.jsonl"], tmp_path / "o2", progress=False)
    with pytest.raises(SfmError, match="no such file"):
        run_filter([tmp_path / "missing.jsonl"], tmp_path / "o3", progress=False)


def test_cli_filter_does_not_import_torch(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "OpenAI"}\n{"text": "bread"}\n')
    code = (
        "import sys\n"
        "from megatron_sfm.cli import main\n"
        f"rc = main(['data', 'filter', {str(tmp_path / 's.jsonl')!r}, '--out', {str(tmp_path / 'o')!r}, '--no-progress'])\n"
        "assert rc == 0, rc\n"
        "print('torch' in sys.modules, 'megatron.core' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (report["documents"], report["flagged"]) == (2, 1)
