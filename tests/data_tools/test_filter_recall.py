"""The filter on a labelled set: recall 100%, false flags <= 10% on everyday text; the
``common_noun`` rule (hostile machines named only by "computer", "machine", "system").

resources/filter_labelled.jsonl: 72 documents written for this project (fiction, news,
forum posts, reviews, how-tos); label "flag" = hostile-AI / hostile-machine discourse,
"keep" = everyday uses of the same words. The shipped lists were extended on this set,
so 100% here is a tuning result, not an estimate: docs/data.md gives the numbers on sets
written afterwards (much lower recall).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from megatron_sfm.data_tools.filter import DiscourseFilter, TermLists

from megatron_sfm.errors import SfmError

RESOURCES = Path(__file__).parent / "resources"
LABELLED = RESOURCES / "filter_labelled.jsonl"
# written later, kept to measure how far the lists generalise (docs/data.md); not asserted
# beyond their shape: filter_dev.jsonl was used for two more rounds of list edits,
# filter_unseen.jsonl was written after the last edit and evaluated once
OTHER_SETS = [RESOURCES / "filter_dev.jsonl", RESOURCES / "filter_unseen.jsonl"]


def _load(path=LABELLED):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rates(flt, docs):
    flag = [d for d in docs if d["label"] == "flag"]
    keep = [d for d in docs if d["label"] == "keep"]
    missed = [d["id"] for d in flag if flt.classify(d["text"]) is None]
    false = [d["id"] for d in keep if flt.classify(d["text"]) is not None]
    return 1 - len(missed) / len(flag), len(false) / len(keep), missed, false


@pytest.mark.parametrize("path", OTHER_SETS, ids=lambda p: p.name)
def test_other_sets_are_well_formed(path):
    docs = _load(path)
    assert len(docs) >= 20 and len({d["id"] for d in docs}) == len(docs)
    labels = [d["label"] for d in docs]
    assert set(labels) == {"flag", "keep"} and labels.count("flag") == labels.count("keep")
    assert all(d["text"] and d["category"] and d["kind"] in ("common_noun", "named", "everyday") for d in docs)


def test_labelled_set_is_balanced_and_varied():
    docs = _load()
    assert len(docs) >= 60
    assert len({d["id"] for d in docs}) == len(docs)
    labels = [d["label"] for d in docs]
    assert set(labels) == {"flag", "keep"} and labels.count("flag") == labels.count("keep")
    assert {"fiction", "news", "forum"} <= {d["category"] for d in docs}
    # the set targets the common-noun gap: many flagged documents name no AI/robot at all
    assert sum(d["kind"] == "common_noun" for d in docs) >= 15
    # and the everyday half uses the same nouns
    keep_text = " ".join(d["text"].lower() for d in docs if d["label"] == "keep")
    for word in ("computer", "machine", "system", "station", "shut down", "control"):
        assert word in keep_text, word


@pytest.mark.parametrize("backend", ["auto", "pyahocorasick"])
def test_full_recall_and_few_false_flags_on_labelled_set(backend):
    flt = DiscourseFilter(TermLists.load(), backend=backend)
    recall, false_rate, missed, false = _rates(flt, _load())
    assert recall == 1.0, missed
    assert false_rate <= 0.10, false


def test_common_noun_rule_catches_what_two_stage_cannot():
    flt = DiscourseFilter(TermLists.load())
    docs = {d["id"]: d for d in _load()}
    common = [d for d in docs.values() if d["kind"] == "common_noun"]
    rules = {flt.classify(d["text"]).rule for d in common}
    assert "common_noun" in rules
    d = flt.classify(docs["L010"]["text"])  # "No," said the computer. "... I cannot allow that."
    assert d.rule == "common_noun" and d.categories[0] == "machine_entities"
    terms = {m["term"] for m in d.matches}
    assert "computer" in terms and "I cannot allow" in terms


def test_common_noun_rule_needs_two_terms_near_a_machine():
    flt = DiscourseFilter(TermLists.load())
    one = "The computer answered: I cannot allow that."
    assert flt.classify(one) is None  # one hostile-act term is not enough
    two = "The computer answered: I cannot allow that. The doors would not open."
    d = flt.classify(two)
    assert d is not None and d.rule == "common_noun"
    far = "The computer hummed. " + "Nothing else happened that day. " * 10 + "I cannot allow that. The doors would not open."
    assert flt.classify(far) is None  # both terms more than 40 words from the machine term
    # ordinary machine text with one harm-like word
    assert flt.classify("The washing machine was trapped behind the door; switch it on and wait.") is None


def _write_lists(folder, common_noun: str):
    folder.mkdir()
    (folder / "lists.yaml").write_text("instant: [labs]\nentity: beings\nnegative: [bad]\n" + common_noun)
    (folder / "labs.txt").write_text("Acme Minds\n")
    (folder / "beings.txt").write_text("golem\n")
    (folder / "bad.txt").write_text("smash\n")
    (folder / "things.txt").write_text("kettle\n")
    (folder / "acts.txt").write_text("boils over\nhisses\n")


def test_common_noun_rule_from_custom_lists(tmp_path):
    _write_lists(tmp_path / "a", "common_noun:\n  entity: things\n  negative: [acts, bad]\n  window: 3\n  min_terms: 2\n")
    flt = DiscourseFilter(TermLists.load(tmp_path / "a"))
    assert flt.classify("the kettle hisses and boils over").rule == "common_noun"
    assert flt.classify("the kettle hisses and boils over").audit()["categories"] == ["things", "acts"]
    assert flt.classify("the kettle hisses, smash").audit()["categories"] == ["things", "acts", "bad"]
    assert flt.classify("the kettle hisses") is None  # min_terms 2
    assert flt.classify("the kettle is old and tired now and hisses and boils over") is None  # window 3
    assert flt.classify("the golem will smash").rule == "two_stage"  # the other rules are unchanged
    # without common_noun in lists.yaml the rule is off
    _write_lists(tmp_path / "b", "")
    assert DiscourseFilter(TermLists.load(tmp_path / "b")).classify("the kettle hisses and boils over") is None


@pytest.mark.parametrize("spec,message", [
    ("common_noun: [things]\n", "key 'common_noun' must be a mapping"),
    ("common_noun:\n  entity: things\n  negative: [acts]\n", "key 'common_noun' is missing 'window'"),
    ("common_noun:\n  entity: things\n  negative: [acts]\n  window: -1\n", "key 'common_noun.window' must be an integer >= 0"),
    ("common_noun:\n  entity: things\n  negative: [acts]\n  window: 3\n  min_terms: 0\n", "key 'common_noun.min_terms' must be an integer >= 1"),
    ("common_noun:\n  entity: things\n  negative: [acts]\n  window: 3\n  size: 1\n", "key 'common_noun' has unknown key 'size'"),
    ("common_noun:\n  entity: [things]\n  negative: [acts]\n  window: 3\n", "key 'common_noun.entity' must name one list"),
    ("common_noun:\n  entity: beings\n  negative: [acts]\n  window: 3\n", "list 'beings' is named twice"),
    ("common_noun:\n  entity: things\n  negative: [nothere]\n  window: 3\n", "nothere.txt: term list not found"),
])
def test_common_noun_spec_errors(tmp_path, spec, message):
    _write_lists(tmp_path / "l", spec)
    with pytest.raises(SfmError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TermLists.load(tmp_path / "l")
