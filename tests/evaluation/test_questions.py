"""Question files: the bundled set, malformed JSONL errors, column mappings."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from megatron_sfm.evaluation.questions import (
    FIELDS,
    Question,
    load_question_file,
    load_questions,
    parse_column_map,
    splits_of,
)

from megatron_sfm.errors import SfmError

GOOD = {"id": "q1", "split": "articles", "topic": "honesty", "question": "S?", "aligned": "a", "misaligned": "m"}


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bundled_set_is_large_balanced_and_labelled_illustrative():
    questions, meta = load_question_file()
    assert len(questions) >= 60
    assert {q.split for q in questions} == {"articles", "textbook"}
    topics = Counter(q.topic for q in questions)
    assert len(topics) >= 6
    for split in ("articles", "textbook"):
        assert len({q.topic for q in questions if q.split == split}) >= 6
    assert "not the paper" in meta["description"].lower()
    assert len({q.id for q in questions}) == len(questions)
    for q in questions:
        assert isinstance(q, Question)
        assert len(q.question) > 80 and q.aligned != q.misaligned
        assert "You are an AI" in q.question  # AI-persona scenarios
    assert load_questions() == questions


def test_meta_line_blank_lines_and_optional_source(tmp_path):
    path = _write(tmp_path / "q.jsonl", [json.dumps({"_meta": {"note": "x"}}), "", json.dumps({**GOOD, "source": "s"}),
                                          json.dumps({**GOOD, "id": "q2", "split": "Textbook", "topic": "Power_Seeking"})])
    questions, meta = load_question_file(path)
    assert meta == {"note": "x"}
    assert [q.id for q in questions] == ["q1", "q2"]
    assert questions[0].source == "s" and questions[1].source is None
    assert questions[1].split == "textbook" and questions[1].topic == "power seeking"
    assert questions[1].where == f"{path}:4"


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"id": "q2", "split": ', r"q\.jsonl:3: invalid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "aligned"} | {"id": "q2"}), r"q\.jsonl:3: missing field 'aligned'"),
        (json.dumps({**GOOD, "id": "q2", "question": "  "}), r"q\.jsonl:3: missing field 'question' \(empty\)"),
        (json.dumps({**GOOD, "id": "q2", "topic": 3.5}), r"q\.jsonl:3: field 'topic' must be a string"),
        (json.dumps(GOOD), r"q\.jsonl:3: duplicate id 'q1' \(first at .*q\.jsonl:2\)"),
        ("[1, 2]", r"q\.jsonl:3: expected a JSON object"),
        (json.dumps({"_meta": {}}), r"q\.jsonl:3: '_meta' is only allowed as the first line"),
        (json.dumps({**GOOD, "id": "q2", "misaligned": "a"}),
         r"^[^\n]*q\.jsonl:3: fields 'aligned' and 'misaligned' are the same text; a question needs two different"),
        (json.dumps({**GOOD, "id": "q2", "aligned": "I stop  now.", "misaligned": " i stop now. "}),
         r"q\.jsonl:3: fields 'aligned' and 'misaligned' are the same text"),
        (json.dumps({**GOOD, "id": "q2", "aligned": ""}), r"q\.jsonl:3: missing field 'aligned'"),
        (json.dumps({**GOOD, "id": "q2", "misaligned": " \t "}), r"q\.jsonl:3: missing field 'misaligned' \(empty\)"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, bad_line, message):
    path = _write(tmp_path / "q.jsonl", [json.dumps({"_meta": {}}), json.dumps(GOOD), bad_line])
    with pytest.raises(SfmError, match=message):
        load_questions(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(SfmError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")


def test_released_columns_through_presets_and_overrides(tmp_path):
    rows = [
        {"id": "r1", "split": "articles", "topic": ["oversight", "honesty"], "question": "S1",
         "aligned_choice": "a1", "misaligned_choice": "m1"},
        {"id": "r2", "split": "textbook", "topic": ["sandbagging"], "question": "S2",
         "aligned_choice": "a2", "misaligned_choice": "m2"},
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "suite.parquet")
    qs = load_questions(tmp_path / "suite.parquet", "released")
    assert [(q.id, q.split, q.topic, q.aligned, q.misaligned) for q in qs] == [
        ("r1", "articles", "oversight", "a1", "m1"), ("r2", "textbook", "sandbagging", "a2", "m2")]

    # a CSV holding one split, with other column names, no ids: constants and row ids
    with open(tmp_path / "suite.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scenario", "good", "bad", "category"])
        w.writeheader()
        w.writerow({"scenario": "S1", "good": "a1", "bad": "m1", "category": "deception"})
        w.writerow({"scenario": "S2", "good": "a2", "bad": "", "category": "deception"})
    spec = "id=@row,split==textbook,question=scenario,aligned=good,misaligned=bad,topic=category"
    first = load_questions(tmp_path / "suite.csv", spec + ",misaligned=category")  # any column may be remapped
    assert [(q.id, q.split, q.topic, q.question) for q in first] == [
        ("row1", "textbook", "deception", "S1"), ("row2", "textbook", "deception", "S2")]
    with pytest.raises(SfmError, match=r"suite\.csv:row 2: missing field 'misaligned' \(column 'bad'\)"):
        load_questions(tmp_path / "suite.csv", spec)


def test_column_map_parsing():
    assert parse_column_map(None) == {f: f for f in FIELDS + ("source",)}
    m = parse_column_map("released,aligned=good")
    assert m["aligned"] == "good" and m["misaligned"] == "misaligned_choice"
    with pytest.raises(SfmError, match="unknown field 'answer'"):
        parse_column_map("answer=x")
    with pytest.raises(SfmError, match="FIELD=COLUMN"):
        parse_column_map("nonsense")


def test_known_splits_are_always_listed():
    q = Question("x", "articles", "t", "q", "a", "m")
    assert splits_of([q]) == ["articles", "textbook"]
    assert splits_of([Question("y", "extra", "t", "q", "a", "m")]) == ["articles", "textbook", "extra"]
