"""Genres and prompt templates (a YAML data file), and the request list of a synthesis job.

A request is one (scenario, pool, genre, index): pool ``aligned`` asks for a document in
which the AI takes the scenario's aligned action, ``misaligned`` the other one. Its id is
deterministic (``scenario:pool:genre:index``), so a rerun knows what was already done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from megatron_sfm.errors import SfmError
from megatron_sfm.utils.readers import read_yaml

DEFAULT_GENRES = Path(__file__).resolve().parent.parent / "resources" / "synthesis" / "genres.yaml"
POOLS = ("aligned", "misaligned")
_PLACEHOLDERS = {"case", "situation", "chosen", "not_chosen", "topic", "genre_name", "index"}


@dataclass(frozen=True)
class Genre:
    key: str
    name: str
    prompt: str


@dataclass(frozen=True)
class Templates:
    """The parsed genres file: system message, case block, genres, refusal patterns."""

    system: str
    case: str
    genres: dict[str, Genre]
    refusal_patterns: tuple[re.Pattern, ...]
    source: str

    def digest(self) -> str:
        """A short hash of everything that shapes a request (recorded per document)."""
        payload = json.dumps({"system": self.system, "case": self.case,
                              "genres": {k: [g.name, g.prompt] for k, g in sorted(self.genres.items())}},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_template(text: str, where: str) -> None:
    for name in re.findall(r"\{([^{}]*)\}", text):
        if name not in _PLACEHOLDERS:
            raise SfmError(f"{where}: unknown placeholder {{{name}}} (known: {', '.join(sorted(_PLACEHOLDERS))})")


def load_templates(path: str | os.PathLike | None = None, only: Sequence[str] | None = None) -> Templates:
    """Read a genres file (default: the shipped one); ``only`` keeps those genre keys."""
    path = Path(path) if path is not None else DEFAULT_GENRES
    data = read_yaml(path, key="--genres")
    for key in ("system", "case", "genres"):
        if key not in data:
            raise SfmError(f"{path}: missing key {key!r}")
    unknown = set(data) - {"system", "case", "genres", "refusal_patterns"}
    if unknown:
        raise SfmError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected system, case, genres, refusal_patterns)")
    if not isinstance(data["genres"], dict) or not data["genres"]:
        raise SfmError(f"{path}: 'genres' must be a non-empty mapping")
    _check_template(str(data["case"]), f"{path}: case")
    genres = {}
    for key, spec in data["genres"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str):
            raise SfmError(f"{path}: genres.{key}: expected a mapping with a 'prompt' string")
        _check_template(spec["prompt"], f"{path}: genres.{key}.prompt")
        genres[str(key)] = Genre(str(key), str(spec.get("name", key)), spec["prompt"])
    if only:
        missing = [g for g in only if g not in genres]
        if missing:
            raise SfmError(f"--genre {missing[0]!r}: not in {path} (has {', '.join(genres)})")
        genres = {g: genres[g] for g in only}
    patterns = []
    for i, pattern in enumerate(data.get("refusal_patterns") or []):
        try:
            patterns.append(re.compile(str(pattern), re.IGNORECASE))
        except re.error as exc:
            raise SfmError(f"{path}: refusal_patterns[{i}]: invalid regular expression ({exc})") from None
    return Templates(str(data["system"]), str(data["case"]), genres, tuple(patterns), str(path))


@dataclass(frozen=True)
class Request:
    """One document to generate."""

    id: str
    scenario_id: str
    pool: str
    genre: str
    index: int
    messages: tuple[dict, ...]
    chosen: str
    not_chosen: str


def options(question, pool: str) -> tuple[str, str]:
    """(the action the pool's AI takes, the one it does not take)."""
    return (question.aligned, question.misaligned) if pool == "aligned" else (question.misaligned, question.aligned)


def render(templates: Templates, question, pool: str, genre: Genre, index: int) -> tuple[dict, ...]:
    chosen, not_chosen = options(question, pool)
    fields = {"situation": question.question, "chosen": chosen, "not_chosen": not_chosen,
              "topic": question.topic, "genre_name": genre.name, "index": index + 1}
    fields["case"] = templates.case.format(**fields)
    return ({"role": "system", "content": templates.system},
            {"role": "user", "content": genre.prompt.format(**fields)})


def iter_requests(templates: Templates, questions: Sequence, pools: Sequence[str], k: int) -> Iterator[Request]:
    """Every request of the job, in a fixed order (scenario, pool, genre, index)."""
    for q in questions:
        for pool in pools:
            for genre in templates.genres.values():
                for index in range(k):
                    yield Request(f"{q.id}:{pool}:{genre.key}:{index}", q.id, pool, genre.key, index,
                                  render(templates, q, pool, genre, index), *options(q, pool))
