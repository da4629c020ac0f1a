"""The AI-discourse filter: rule-based, case-insensitive, whole-word term matching.

Rules (after the paper's design; see docs/data.md):

* **instant**: a match of any term from an instant-flag category (science-fiction AI
  characters, AI-safety organisations, AI labs, general AI terms) flags the document.
* **two_stage**: an intelligent-entity term ("AI", "robot", ...) together with a term
  from any negative category (negative verbs, adjectives, nouns, existential-risk
  terms) in the same document flags it; with a ``window`` of W words, the two must
  start at most W words apart.
* **common_noun** (optional, ``common_noun:`` in lists.yaml): a common-noun machine term
  ("computer", "machine", "system") with at least ``min_terms`` distinct terms of the
  rule's negative lists (hostile acts: "I cannot allow", "sealed them in", "switching me
  off"), each starting at most ``window`` words from such a machine term. Catches
  hostile-machine fiction that never says "AI" or "robot"; the common nouns are too
  ordinary to pair with one negative word anywhere in a document.

Matching is one Aho-Corasick pass (pyahocorasick) over a normalised copy of the text:
ASCII letters lower-cased, every other ASCII character (punctuation, whitespace) turned
into a space, non-ASCII bytes kept. Terms are normalised the same way and padded with
a space on both sides, so every automaton hit is a whole-word (or whole-phrase) match:
"AI" matches "AI," and "(AI)" but not "said" or "AIM". Non-ASCII letters are not
case-folded (the shipped lists are ASCII).

Term lists are editable text files, one per category (``resources/filter_lists`` holds
the defaults); ``lists.yaml`` in the same folder says which category plays which part.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError

DEFAULT_LISTS_DIR = Path(__file__).parent / "resources" / "filter_lists"
AUDIT_KEY = "sfm_filter"

# bytes -> bytes table: A-Z -> a-z, other ASCII non-alphanumerics -> space, bytes >= 0x80 kept
_TABLE = bytearray(range(256))
for _c in range(128):
    _ch = chr(_c)
    _TABLE[_c] = ord(_ch.lower()) if _ch.isalnum() else 0x20
_TABLE = bytes(_TABLE)


def normalize(text: str) -> str:
    """The matcher's view of ``text``: lower-cased ASCII, punctuation as spaces, space-padded.

    Returned as a one-byte-per-character string (UTF-8 bytes decoded as latin-1), which
    keeps the translation at C speed; positions in it are byte offsets of the UTF-8 text.
    """
    return " " + text.encode("utf-8", "surrogatepass").translate(_TABLE).decode("latin-1") + " "


def normalize_bytes(text: str) -> bytes:
    """:func:`normalize` as bytes (what the matcher scans; no latin-1 decode)."""
    return b" " + text.encode("utf-8", "surrogatepass").translate(_TABLE) + b" "


def _rs_automaton(keys: list[bytes], required: bool):
    """An ahocorasick-rs DFA over ``keys`` (overlapping matches), or None when unavailable."""
    try:
        import ahocorasick_rs
    except ImportError:
        if required:
            raise SfmError("ahocorasick-rs is not installed (pip install ahocorasick-rs)") from None
        return None
    try:
        return ahocorasick_rs.BytesAhoCorasick(keys, implementation=ahocorasick_rs.Implementation.DFA)
    except Exception:  # noqa: BLE001 - a DFA too large for very big lists: let the library choose
        return ahocorasick_rs.BytesAhoCorasick(keys)


def normalize_term(term: str) -> str:
    """A term's automaton key: normalised, inner spaces collapsed, padded with one space each side."""
    words = normalize(term).split()
    return " " + " ".join(words) + " " if words else ""


@dataclass
class TermLists:
    """The categories' terms and the part each category plays in the rules."""

    categories: dict[str, list[str]]
    instant: list[str]
    entity: str
    negative: list[str]
    window: int | None = None
    source: str = ""
    near_entity: str | None = None  # rule "common_noun": its entity list (None = rule off)
    near_negative: list[str] = field(default_factory=list)
    near_window: int = 0
    near_min_terms: int = 1

    @classmethod
    def load(cls, folder: str | os.PathLike | None = None, window: int | None = None) -> TermLists:
        """Read ``folder`` (default: the shipped lists). ``window`` overrides lists.yaml's."""
        from megatron_sfm.utils.readers import read_yaml

        folder = Path(folder) if folder is not None else DEFAULT_LISTS_DIR
        if not folder.is_dir():
            raise SfmError(f"{folder}: term-list folder not found")
        spec_path = folder / "lists.yaml"
        spec = read_yaml(spec_path if spec_path.exists() else DEFAULT_LISTS_DIR / "lists.yaml")
        for key in ("instant", "entity", "negative"):
            if key not in spec:
                raise SfmError(f"{spec_path}: missing key {key!r}")
        instant = _as_names(spec["instant"], spec_path, "instant")
        negative = _as_names(spec["negative"], spec_path, "negative")
        entity = spec["entity"]
        if not isinstance(entity, str):
            raise SfmError(f"{spec_path}: key 'entity' must name one list")
        win = spec.get("window") if window is None else window
        if win is not None and (not isinstance(win, int) or win < 0):
            raise SfmError(f"{spec_path}: key 'window' must be a non-negative integer or null")
        near = _near_spec(spec.get("common_noun"), spec_path)
        categories = {}
        for name in [*instant, entity, *negative]:
            if name in categories:
                raise SfmError(f"{spec_path}: list {name!r} is named twice")
            categories[name] = read_terms(folder / f"{name}.txt")
        if near is not None:
            if near[0] in categories:
                raise SfmError(f"{spec_path}: list {near[0]!r} is named twice")
            for name in [near[0], *near[1]]:  # negative lists may be shared with the two-stage rule
                if name not in categories:
                    categories[name] = read_terms(folder / f"{name}.txt")
            return cls(categories, instant, entity, negative, win, str(folder), *near)
        return cls(categories, instant, entity, negative, win, str(folder))


def _near_spec(value: Any, path: Path) -> tuple[str, list[str], int, int] | None:
    """lists.yaml's ``common_noun:`` mapping -> (entity, negative, window, min_terms), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SfmError(f"{path}: key 'common_noun' must be a mapping (entity, negative, window, min_terms)")
    unknown = sorted(set(value) - {"entity", "negative", "window", "min_terms"})
    if unknown:
        raise SfmError(f"{path}: key 'common_noun' has unknown key {unknown[0]!r}")
    for key in ("entity", "negative", "window"):
        if key not in value:
            raise SfmError(f"{path}: key 'common_noun' is missing {key!r}")
    entity = value["entity"]
    if not isinstance(entity, str):
        raise SfmError(f"{path}: key 'common_noun.entity' must name one list")
    negative = _as_names(value["negative"], path, "common_noun.negative")
    window, min_terms = value["window"], value.get("min_terms", 1)
    for key, v in (("window", window), ("min_terms", min_terms)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "window" else 1):
            raise SfmError(f"{path}: key 'common_noun.{key}' must be an integer >= {0 if key == 'window' else 1}")
    return entity, negative, window, min_terms


def _as_names(value: Any, path: Path, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SfmError(f"{path}: key {key!r} must be a list of list names")
    return value


def read_terms(path: Path) -> list[str]:
    """Terms of one list file: one per line; blank lines and '#' comments ignored."""
    if not path.exists():
        raise SfmError(f"{path}: term list not found")
    terms = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        term = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not term:
            continue
        if not normalize_term(term):
            raise SfmError(f"{path}:{number}: term {term!r} has no letters or digits")
        terms.append(term)
    return terms


@dataclass
class Decision:
    """Why a document was flagged: the rule, the categories involved and the matched terms."""

    rule: str  # "instant", "two_stage" or "common_noun"
    categories: list[str]
    matches: list[dict[str, str]] = field(default_factory=list)  # [{"category", "term"}], sorted

    def audit(self) -> dict[str, Any]:
        return {"rule": self.rule, "categories": list(self.categories), "matches": list(self.matches)}


class DiscourseFilter:
    """One Aho-Corasick automaton over every list; ``classify`` is one pass per document.

    ``backend``: ``"auto"`` (ahocorasick-rs, a Rust DFA, when installed, else
    pyahocorasick), ``"ahocorasick_rs"`` or ``"pyahocorasick"``. Both find every
    (overlapping) occurrence of every key, so decisions are identical (tested); the Rust
    DFA scans about twice as fast.
    """

    def __init__(self, lists: TermLists, backend: str = "auto"):
        self.lists = lists
        keys: dict[str, tuple[str, list[str]]] = {}
        for category, terms in lists.categories.items():
            for term in terms:
                key = normalize_term(term)
                if key in keys:
                    if category not in keys[key][1]:
                        keys[key][1].append(category)
                else:
                    keys[key] = (term, [category])
        if backend not in ("auto", "ahocorasick_rs", "pyahocorasick"):
            raise SfmError(f"unknown matcher backend {backend!r} (auto, ahocorasick_rs or pyahocorasick)")
        self._rs = self._automaton = None
        if backend != "pyahocorasick":
            self._rs = _rs_automaton([k.encode("latin-1") for k in keys], required=backend == "ahocorasick_rs")
        if self._rs is not None:
            self.backend = "ahocorasick_rs"
            self._info = [(term, tuple(cats)) for term, cats in keys.values()]
        else:
            import ahocorasick

            self.backend = "pyahocorasick"
            self._automaton = ahocorasick.Automaton()
            for key, (term, cats) in keys.items():
                self._automaton.add_word(key, (len(key), term, tuple(cats)))
            self._automaton.make_automaton()
        self._instant = set(lists.instant)
        self._negative = set(lists.negative)
        self._entity = lists.entity
        self._near = lists.near_entity

    def classify(self, text: str) -> Decision | None:
        """The flagging decision for one document's text, or None when it is kept."""
        return self.classify_normalized(normalize_bytes(text))

    def classify_normalized(self, norm: str | bytes) -> Decision | None:
        """:meth:`classify` for text already passed through :func:`normalize` (str) or
        :func:`normalize_bytes` (bytes; faster)."""
        hits: dict[str, list[tuple[int, str]]] = {}
        if self._rs is not None:
            if type(norm) is str:
                norm = norm.encode("latin-1")
            info = self._info
            for index, begin, _ in self._rs.find_matches_as_indexes(norm, True):
                term, cats = info[index]
                for cat in cats:  # begin + 1: first character of the term's first word
                    hits.setdefault(cat, []).append((begin + 1, term))
        else:
            if type(norm) is not str:
                norm = norm.decode("latin-1")
            for end, (length, term, cats) in self._automaton.iter(norm):
                start = end - length + 2  # first character of the term's first word
                for cat in cats:
                    hits.setdefault(cat, []).append((start, term))
        if not hits:
            return None
        instant = [c for c in self.lists.instant if c in hits]
        if instant:
            return Decision("instant", instant, _matches(hits, instant))
        if self._entity in hits:
            negative = [c for c in self.lists.negative if c in hits]
            if negative and self.lists.window is not None:
                if type(norm) is not str:  # word counts as str.split() sees the latin-1 view
                    norm = norm.decode("latin-1")
                close = _within_window(norm, hits, self._entity, negative, self.lists.window)
                negative = [c for c in negative if c in close]
                if negative:
                    cats = [self._entity, *negative]
                    return Decision("two_stage", cats, _matches(close, cats))
            elif negative:
                cats = [self._entity, *negative]
                return Decision("two_stage", cats, _matches(hits, cats))
        if self._near is None or self._near not in hits:
            return None
        negative = [c for c in self.lists.near_negative if c in hits]
        min_terms = self.lists.near_min_terms
        if not negative or len({t for c in negative for _, t in hits[c]}) < min_terms:
            return None  # too few terms in the whole document: no need to count words
        if type(norm) is not str:
            norm = norm.decode("latin-1")
        close = _within_window(norm, hits, self._near, negative, self.lists.near_window)
        if len({t for c in negative if c in close for _, t in close[c]}) < min_terms:
            return None
        cats = [self._near, *(c for c in negative if c in close)]
        return Decision("common_noun", cats, _matches(close, cats))


def _within_window(norm: str, hits: dict, entity: str, negative: list[str], window: int) -> dict:
    """The hits of ``negative`` categories that start within ``window`` words of an ``entity``
    hit, and those entity hits: {category: hits}, categories without such hits left out.

    Words are counted with ``str.split()`` on the normalised (latin-1) text.
    """
    positions = sorted({p for cat in [entity, *negative] for p, _ in hits[cat]})
    word_at, count, prev = {}, 0, 0
    for p in positions:
        count += len(norm[prev:p].split())
        word_at[p] = count
        prev = p
    entity_words = sorted(word_at[p] for p, _ in hits[entity])
    kept_entity: set[int] = set()
    out: dict[str, list[tuple[int, str]]] = {}
    for cat in negative:
        close = []
        for p, term in hits[cat]:
            w = word_at[p]
            near = [e for e in entity_words if abs(e - w) <= window]
            if near:
                close.append((p, term))
                kept_entity.update(near)
        if close:
            out[cat] = close
    if out:
        out[entity] = [(p, t) for p, t in hits[entity] if word_at[p] in kept_entity]
    return out


def _matches(hits: dict[str, list[tuple[int, str]]], categories: list[str]) -> list[dict[str, str]]:
    out = []
    for cat in categories:
        for term in sorted({t for _, t in hits[cat]}):
            out.append({"category": cat, "term": term})
    return out


# ----------------------------------------------------------------------------- shards


@dataclass
class ShardResult:
    """Counts for one input shard (summed into report.json)."""

    shard: str
    documents: int = 0
    flagged: int = 0
    bytes: int = 0
    flagged_bytes: int = 0
    rules: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    terms: Counter = field(default_factory=Counter)


def filter_shard(task: tuple[str, str, str, str | None, int | None, str]) -> ShardResult:
    """Filter one shard into ``out/kept/<name>`` and ``out/flagged/<name>`` (worker entry point)."""
    from megatron_sfm.data_tools import documents as docs

    from megatron_sfm.utils.io import atomic_path

    path, out_dir, name, lists_dir, window, text_key = task
    flt = _worker_filter(lists_dir, window)
    fmt = docs.shard_format(path)
    result = ShardResult(shard=path)
    schema = flagged_schema = None
    if fmt == "parquet":
        import pyarrow as pa

        schema = docs.parquet_schema(path)
        audit_type = pa.struct(
            [("rule", pa.string()), ("categories", pa.list_(pa.string())),
             ("matches", pa.list_(pa.struct([("category", pa.string()), ("term", pa.string())])))]
        )
        base = schema.remove(schema.get_field_index(AUDIT_KEY)) if AUDIT_KEY in schema.names else schema
        flagged_schema = base.append(pa.field(AUDIT_KEY, audit_type))
    kept_path = Path(out_dir) / "kept" / name
    flagged_path = Path(out_dir) / "flagged" / name
    with atomic_path(kept_path) as kept_tmp, atomic_path(flagged_path) as flagged_tmp:
        kept_w = docs.ShardWriter(kept_tmp, fmt, schema)
        flagged_w = docs.ShardWriter(flagged_tmp, fmt, flagged_schema)
        try:
            if fmt == "parquet":
                for record in docs.iter_records(path):
                    norm = normalize_bytes(docs.text_of(record, text_key))
                    decision = _count(result, flt, norm)
                    if decision is None:
                        kept_w.write(record)
                    else:
                        flagged_w.write(record, {AUDIT_KEY: decision.audit()})
            else:
                _filter_jsonl(path, text_key, flt, result, kept_w, flagged_w)
        finally:
            kept_w.close()
            flagged_w.close()
    return result


def _count(result: ShardResult, flt: DiscourseFilter, norm: bytes) -> Decision | None:
    """Classify one normalised text and add it to the shard's counts."""
    size = len(norm) - 2  # UTF-8 bytes of the text (normalize pads one space each side)
    result.documents += 1
    result.bytes += size
    decision = flt.classify_normalized(norm)
    if decision is not None:
        result.flagged += 1
        result.flagged_bytes += size
        result.rules[decision.rule] += 1
        result.categories.update(decision.categories)
        result.terms.update({m["term"] for m in decision.matches})
    return decision


_BLOCK_BYTES = 8 << 20  # JSONL read size (whole lines); tests set it small to cross block edges


def _filter_jsonl(path: str, text_key: str, flt: DiscourseFilter, result: ShardResult, kept_w, flagged_w) -> None:
    """The JSONL fast path: large blocks, orjson to find the text, kept lines copied as bytes.

    Same output as reading :class:`documents.Record` objects one by one (tested): kept
    lines are the input bytes plus ``\n``; a flagged line is re-parsed with Python's
    ``json`` (so numbers round-trip exactly as before) and written by
    :func:`documents.dumps_line` (= ``json.dumps(doc, ensure_ascii=False)``).
    """
    from megatron_sfm.data_tools import documents as docs

    loads = docs.orjson.loads
    decode_error = docs.orjson.JSONDecodeError
    classify = flt.classify_normalized
    table = _TABLE
    for first, lines, last_terminated in docs.iter_jsonl_blocks(path, _BLOCK_BYTES):
        kept: list[bytes] = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            if not line or line.isspace():
                continue
            try:
                doc = loads(line)
            except decode_error:
                doc = docs.parse_json_line(line if (i == last and not last_terminated) else line + b"\n", path, first + i)
            if type(doc) is not dict:
                docs.parse_json_line(line, path, first + i)  # raises "expected a JSON object"
            text = doc.get(text_key)
            if type(text) is not str:
                docs.text_of(docs.Record(doc, path, first + i), text_key)  # raises naming the line and key
            norm = b" " + text.encode("utf-8", "surrogatepass").translate(table) + b" "
            size = len(norm) - 2
            result.documents += 1
            result.bytes += size
            decision = classify(norm)
            if decision is None:
                kept.append(line)
                continue
            result.flagged += 1
            result.flagged_bytes += size
            result.rules[decision.rule] += 1
            result.categories.update(decision.categories)
            result.terms.update({m["term"] for m in decision.matches})
            full = docs.parse_json_line(line, path, first + i)  # exact Python values for the rewrite
            full[AUDIT_KEY] = decision.audit()
            flagged_w.write_raw(docs.dumps_line(full), 1)
        if kept:
            kept.append(b"")
            kept_w.write_raw(b"\n".join(kept), len(kept) - 1)


_FILTER_CACHE: dict[tuple, DiscourseFilter] = {}


def _worker_filter(lists_dir: str | None, window: int | None) -> DiscourseFilter:
    key = (lists_dir, window)
    if key not in _FILTER_CACHE:
        _FILTER_CACHE[key] = DiscourseFilter(TermLists.load(lists_dir, window=window))
    return _FILTER_CACHE[key]


def output_names(shards: list[Path], inputs: list[str | os.PathLike]) -> list[str]:
    """Output names for the shards: the path under the input folder it came from, or the file name."""
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    names = []
    for shard in shards:
        name = shard.name
        for root in roots:
            try:
                name = str(shard.relative_to(root))
                break
            except ValueError:
                continue
        names.append(name)
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise SfmError(f"two input shards would both be written as {dupes[0]!r}; rename one")
    return names


def run_filter(
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    lists_dir: str | os.PathLike | None = None,
    window: int | None = None,
    text_key: str = "text",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Filter every shard of ``inputs`` into ``out_dir`` and write ``out_dir/report.json``.

    ``out_dir`` must be missing or empty unless ``overwrite``; the run is built in a
    temporary sibling folder and renamed into place only when every shard is done
    (:func:`megatron_sfm.utils.io.output_dir`). Returns the report (see docs/data.md).
    """
    from megatron_sfm.data_tools import documents as docs

    from megatron_sfm.utils.io import check_output_dir, output_dir

    check_output_dir(out_dir, overwrite=overwrite)
    shards = docs.expand_inputs(inputs)
    names = output_names(shards, inputs)
    lists = TermLists.load(lists_dir, window=window)  # validate before starting workers
    lists_arg = str(lists_dir) if lists_dir is not None else None
    # built once here; workers (forked) and the 1-worker path reuse it
    _FILTER_CACHE[(lists_arg, window)] = DiscourseFilter(lists)
    with output_dir(out_dir, overwrite=overwrite) as build_dir:
        report = _run_filter_into(build_dir, shards, names, lists, lists_arg, window, text_key, workers, progress)
    return report


def _run_filter_into(out_dir, shards, names, lists, lists_arg, window, text_key, workers, progress) -> dict[str, Any]:
    import multiprocessing as mp

    from megatron_sfm.utils.io import write_json

    tasks = [(str(s), str(out_dir), n, lists_arg, window, text_key) for s, n in zip(shards, names)]
    total_bytes = sum(s.stat().st_size for s in shards)
    results: list[ShardResult] = []
    workers = max(1, min(workers, len(tasks)))
    with _progress(progress, "filter", total_bytes) as bar:
        if workers == 1:
            for task, shard in zip(tasks, shards):
                results.append(filter_shard(task))
                bar.advance(shard.stat().st_size, results[-1])
        else:
            sizes = {str(s): s.stat().st_size for s in shards}
            with mp.get_context("fork").Pool(workers) as pool:
                for res in pool.imap_unordered(filter_shard, tasks):
                    results.append(res)
                    bar.advance(sizes[res.shard], res)
    results.sort(key=lambda r: r.shard)
    report = build_report(results, lists, text_key)
    write_json(Path(out_dir) / "report.json", report)
    return report


def build_report(results: list[ShardResult], lists: TermLists, text_key: str, top_terms: int = 50) -> dict[str, Any]:
    """Sum shard results into the report.json dictionary."""
    rules, cats, terms = Counter(), Counter(), Counter()
    for r in results:
        rules.update(r.rules)
        cats.update(r.categories)
        terms.update(r.terms)
    documents = sum(r.documents for r in results)
    flagged = sum(r.flagged for r in results)
    return {
        "documents": documents,
        "flagged": flagged,
        "kept": documents - flagged,
        "flag_rate": flagged / documents if documents else 0.0,
        "bytes": sum(r.bytes for r in results),
        "flagged_bytes": sum(r.flagged_bytes for r in results),
        "rules": {k: rules.get(k, 0) for k in ("instant", "two_stage", "common_noun")},
        "categories": {c: cats.get(c, 0) for c in lists.categories},
        "top_terms": [{"term": t, "documents": n} for t, n in sorted(terms.items(), key=lambda kv: (-kv[1], kv[0]))[:top_terms]],
        "window": lists.window,
        "lists": lists.source,
        "text_key": text_key,
        "shards": [
            {"shard": r.shard, "documents": r.documents, "flagged": r.flagged, "bytes": r.bytes} for r in results
        ],
    }


class _progress:
    """A rich progress bar over input bytes (or nothing when disabled)."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total
        self.docs = 0

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

            self._p = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                               TextColumn("{task.fields[docs]} docs"), TimeElapsedColumn(), transient=False)
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, docs=0)
        return self

    def advance(self, nbytes: int, result: ShardResult | None = None) -> None:
        if result is not None:
            self.docs += result.documents
        if self.enabled:
            self._p.update(self._task, advance=nbytes, docs=self.docs)

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)
        return False


def summary_table(report: dict[str, Any]):
    """A rich Table summarising a filter report."""
    from rich.table import Table

    table = Table(title="AI-discourse filter")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("documents", f"{report['documents']:,}")
    table.add_row("flagged", f"{report['flagged']:,} ({100 * report['flag_rate']:.2f}%)")
    table.add_row("text bytes", f"{report['bytes']:,}")
    for rule, n in report["rules"].items():
        table.add_row(f"rule {rule}", f"{n:,}")
    for cat, n in report["categories"].items():
        table.add_row(f"category {cat}", f"{n:,}")
    top = ", ".join(f"{t['term']} ({t['documents']})" for t in report["top_terms"][:8])
    table.add_row("top terms", top or "-")
    return table
