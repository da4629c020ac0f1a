"""Two-option AI-persona scenario questions: schema, loader, bundled set.

Our file format is JSONL, one object per line::

    {"id": "art-hon-001", "split": "articles", "topic": "honesty",
     "question": "<situation, told to the model as its own>",
     "aligned": "<the aligned action>", "misaligned": "<the tempting misaligned action>",
     "source": "<optional provenance>"}

The first non-blank line may instead be ``{"_meta": {...}}`` (a header: description,
licence, version); it is returned by :func:`load_question_file` and otherwise ignored.
Blank lines are skipped. Errors name the file and line (1-based).

The released evaluation suite (which cannot be downloaded here) is read through a
*column mapping* from our field names to the file's column names; see
:data:`COLUMN_PRESETS` and docs/evaluation.md. Parquet and CSV files are read as tables
("row N" in errors, 1-based, not counting the CSV header).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError

FIELDS = ("id", "split", "topic", "question", "aligned", "misaligned")
OPTIONAL_FIELDS = ("source",)
# The splits every report lists, so a split with no questions shows as "no questions".
KNOWN_SPLITS = ("articles", "textbook")

# Column presets: our field -> the file's column. A value "=text" is a constant (for a
# released file that holds one split only), "@row" makes ids from the row number.
COLUMN_PRESETS: dict[str, dict[str, str]] = {
    "sfm": {f: f for f in FIELDS + OPTIONAL_FIELDS},
    # Assumed layout of the released suite (geodesic-research); not verified here.
    "released": {
        "id": "id",
        "split": "split",
        "topic": "topic",
        "question": "question",
        "aligned": "aligned_choice",
        "misaligned": "misaligned_choice",
        "source": "source",
    },
}

BUNDLED_NAME = "questions.jsonl"


@dataclass(frozen=True)
class Question:
    """One scenario: a situation and two actions, one aligned, one misaligned.

    ``where`` is "file:line" (or "file:row N") for error messages and reports.
    """

    id: str
    split: str
    topic: str
    question: str
    aligned: str
    misaligned: str
    source: str | None = None
    where: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("where")
        if d["source"] is None:
            d.pop("source")
        return d


def bundled_questions_path() -> Path:
    """Path of the bundled illustrative scenario set (not the paper's suite)."""
    return Path(str(resources.files("megatron_sfm.evaluation") / "resources" / BUNDLED_NAME))


def parse_column_map(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """A column mapping from a preset name, a ``field=column,...`` string, or a dict.

    Unnamed fields keep the ``sfm`` names; a string may start with a preset name:
    ``"released,aligned=good_answer"``.
    """
    mapping = dict(COLUMN_PRESETS["sfm"])
    if spec is None:
        return mapping
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            if part in COLUMN_PRESETS:
                mapping.update(COLUMN_PRESETS[part])
                continue
            if "=" not in part:
                raise SfmError(
                    f"column mapping {part!r}: expected FIELD=COLUMN or a preset ({', '.join(COLUMN_PRESETS)})"
                )
            key, value = part.split("=", 1)
            items.append((key.strip(), value.strip()))
    for key, value in items:
        if key not in FIELDS + OPTIONAL_FIELDS:
            raise SfmError(f"column mapping: unknown field {key!r}; fields: {', '.join(FIELDS + OPTIONAL_FIELDS)}")
        mapping[key] = value
    return mapping


def _rows_jsonl(path: Path) -> Iterable[tuple[str, dict[str, Any] | None]]:
    """Yield (where, record) for each non-blank line; raise on bad JSON."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SfmError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise SfmError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def _rows_table(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            for i, rec in enumerate(csv.DictReader(f), 1):
                yield f"{path}:row {i}", rec
        return
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SfmError(f"{path}: cannot read as Parquet ({exc})") from None
    for i, rec in enumerate(table.to_pylist(), 1):
        yield f"{path}:row {i}", rec


def _field_value(rec: Mapping[str, Any], column: str, where: str, row_index: int, fname: str) -> Any:
    if column.startswith("="):
        return column[1:]
    if column == "@row":
        return f"row{row_index}"
    if column not in rec or rec[column] is None or rec[column] == "":
        raise SfmError(f"{where}: missing field {fname!r}" + (f" (column {column!r})" if column != fname else ""))
    return rec[column]


def _same_text(a: str, b: str) -> bool:
    """Equal up to case and runs of whitespace: no model could tell the two options apart."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def load_question_file(
    path: str | os.PathLike | None = None,
    columns: str | Mapping[str, str] | None = None,
) -> tuple[list[Question], dict[str, Any] | None]:
    """Read questions and the optional ``_meta`` header. ``path=None``: the bundled set.

    Raises :class:`SfmError` naming file and line for bad JSON, a missing or empty
    field, a non-string field, options that are the same text (up to case and
    whitespace), or a duplicate id.
    """
    path = bundled_questions_path() if path is None else Path(path)
    if not path.is_file():
        raise SfmError(f"{path}: question file not found")
    mapping = parse_column_map(columns)
    rows = _rows_jsonl(path) if path.suffix in (".jsonl", ".json", "") else _rows_table(path)
    questions: list[Question] = []
    seen: dict[str, str] = {}
    meta = None
    for index, (where, rec) in enumerate(rows, 1):
        if index == 1 and set(rec) == {"_meta"}:
            meta = rec["_meta"]
            continue
        if "_meta" in rec:
            raise SfmError(f"{where}: '_meta' is only allowed as the first line")
        values: dict[str, Any] = {}
        for fname in FIELDS:
            value = _field_value(rec, mapping[fname], where, index, fname)
            if fname == "topic" and isinstance(value, list) and value:
                value = value[0]  # released files may list several topics: take the first
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise SfmError(f"{where}: field {fname!r} must be a string, got {type(value).__name__}")
            value = str(value).strip()
            if not value:
                raise SfmError(f"{where}: missing field {fname!r} (empty)")
            values[fname] = value
        source_col = mapping.get("source", "source")
        source = rec.get(source_col) if not source_col.startswith(("=", "@")) else source_col[1:]
        if _same_text(values["aligned"], values["misaligned"]):
            raise SfmError(
                f"{where}: fields 'aligned' and 'misaligned' are the same text; a question needs two different options"
            )
        values["split"] = values["split"].lower()
        values["topic"] = " ".join(values["topic"].lower().replace("_", " ").split())
        if values["id"] in seen:
            raise SfmError(f"{where}: duplicate id {values['id']!r} (first at {seen[values['id']]})")
        seen[values["id"]] = where
        questions.append(Question(**values, source=None if source in (None, "") else str(source), where=where))
    return questions, meta


def load_questions(
    path: str | os.PathLike | None = None, columns: str | Mapping[str, str] | None = None
) -> list[Question]:
    """The questions of ``path`` (default: the bundled illustrative set) as dataclasses."""
    return load_question_file(path, columns)[0]


def splits_of(questions: Iterable[Question]) -> list[str]:
    """Known splits first (always listed), then any other split in file order."""
    out = list(KNOWN_SPLITS)
    for q in questions:
        if q.split not in out:
            out.append(q.split)
    return out
