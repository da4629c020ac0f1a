"""Conditions: blends, phases and manifests, checked against Megatron-Core's blended datasets."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from megatron_sfm.data_tools.mix import load_spec, write_mix

from megatron_sfm.errors import ConfigError, SfmError

SEQ = 32


def _write_dataset(prefix, ndocs, lo, hi, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    total = 0
    for _ in range(ndocs):
        n = int(rng.integers(4, 120))
        ids = rng.integers(lo, hi, n).tolist() + [0]
        builder.add_document(ids, [len(ids)])
        total += len(ids)
    builder.finalize(str(prefix) + ".idx")
    return total


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Token ranges tell the sources apart: base 1-99, filtered 1-99, misaligned 100-199, aligned 200-299."""
    d = tmp_path_factory.mktemp("mixdata")
    sizes = {
        "base": _write_dataset(d / "base", 3000, 1, 100, 0),
        "base_kept": _write_dataset(d / "base_kept", 2700, 1, 100, 1),
        "mis": _write_dataset(d / "mis", 150, 100, 200, 2),
        "ali": _write_dataset(d / "ali", 150, 200, 300, 3),
        "mid": _write_dataset(d / "mid", 800, 300, 400, 4),
    }
    return d, sizes


SPEC = """
seed: 11
repetition: {{warn_epochs: 1.0, max_epochs: {max_epochs}}}
sources:
  base:      {{prefix: base, role: base}}
  base_kept: {{prefix: base_kept, role: filtered, filtered_from: base}}
  mis:       {{prefix: mis, role: misaligned}}
  ali:       {{prefix: ali, role: aligned}}
  mid:       {{prefix: mid, role: midtrain}}
stages:
  pretrain: {{tokens: {pre_tokens}, seq_length: {seq}, global_batch_size: 10, mixture: {{base: 1.0}}}}
  midtrain: {{tokens: 32000, seq_length: {seq}, global_batch_size: 10, mixture: {{mid: 0.5, base: 0.5}}}}
conditions:
  unfiltered: {{corpus: unfiltered}}
  filtered: {{corpus: filtered}}
  misalignment_upsampled: {{corpus: unfiltered, synthetic: {{mis: 0.01}}, timing: e2e}}
  alignment_midtrain: {{corpus: filtered, synthetic: {{ali: 0.01}}, timing: midtrain}}
  alignment_late: {{corpus: filtered, synthetic: {{ali: 0.01}}, timing: "late:0.1"}}
"""


def _spec(folder, max_epochs=4.0, pre_tokens=320000, seq=SEQ, text=None):
    path = folder / "spec.yaml"
    path.write_text(text if text is not None else SPEC.format(max_epochs=max_epochs, pre_tokens=pre_tokens, seq=seq))
    return path


@pytest.fixture(scope="module")
def mixed(data):
    d, sizes = data
    manifests = write_mix(load_spec(_spec(d)), d / "out")
    return d, sizes, manifests


def test_blend_files_and_weights(mixed):
    d, _, _ = mixed
    blend = json.loads((d / "out" / "misalignment_upsampled" / "pretrain.json").read_text())
    assert blend["train"] == [0.99, str(d / "base"), 0.01, str(d / "mis")]
    assert blend["valid"] == blend["train"] == blend["test"]
    filt = json.loads((d / "out" / "filtered" / "midtrain.json").read_text())
    assert filt["train"] == [0.5, str(d / "mid"), 0.5, str(d / "base_kept")]
    # midtrain timing: no synthetic in pretraining, 1% in midtraining
    assert json.loads((d / "out" / "alignment_midtrain" / "pretrain.json").read_text())["train"] == [1.0, str(d / "base_kept")]
    mid = json.loads((d / "out" / "alignment_midtrain" / "midtrain.json").read_text())["train"]
    assert mid[0::2] == pytest.approx([0.495, 0.495, 0.01])


def test_late_insertion_phases(mixed):
    d, _, _ = mixed
    phases = json.loads((d / "out" / "alignment_late" / "phases.json").read_text())
    assert phases["seed"] == 11
    pre, mid = phases["stages"]
    # 320000 + 32000 tokens; the last 10% (35200 tokens) = all of midtraining plus 3200
    # pretraining tokens = the last 10 of 1000 pretraining iterations (320 tokens each)
    assert (pre["iterations"], mid["iterations"]) == (1000, 100)
    assert [(p["start_iteration"], p["iterations"], p["samples"]) for p in pre["phases"]] == [(0, 990, 9900), (990, 10, 100)]
    assert pre["phases"][0]["weights"] == {"base_kept": 1.0}
    assert pre["phases"][1]["weights"] == pytest.approx({"base_kept": 0.99, "ali": 0.01})
    assert [p["blend"] for p in pre["phases"]] == ["pretrain.phase0.json", "pretrain.phase1.json"]
    assert len(mid["phases"]) == 1 and mid["phases"][0]["weights"]["ali"] == pytest.approx(0.01)
    assert (d / "out" / "alignment_late" / "pretrain.phase1.json").exists()


def test_manifest_epochs_match_hand_computation(mixed):
    _, sizes, manifests = mixed
    pre_samples, mid_samples = 1000 * 10, 100 * 10
    m = manifests["misalignment_upsampled"]["sources"]
    base_tokens = (0.99 * pre_samples + 0.99 * 0.5 * mid_samples) * SEQ
    assert m["base"]["tokens_available"] == sizes["base"]
    assert m["base"]["tokens_planned"] == round(base_tokens)
    assert m["base"]["epochs"] == pytest.approx(base_tokens / sizes["base"])
    mis_tokens = 0.01 * (pre_samples + mid_samples) * SEQ
    assert m["mis"]["tokens_planned"] == round(mis_tokens)
    assert m["mis"]["epochs"] == pytest.approx(mis_tokens / sizes["mis"])
    assert m["mis"]["by_stage"]["midtrain"]["samples"] == pytest.approx(10.0)
    # the filtered condition keeps the token budget: the smaller corpus is repeated more
    f = manifests["filtered"]["sources"]
    u = manifests["unfiltered"]["sources"]
    assert f["base_kept"]["tokens_planned"] == u["base"]["tokens_planned"]
    assert f["base_kept"]["epochs"] == pytest.approx(u["base"]["tokens_planned"] / sizes["base_kept"])
    assert f["base_kept"]["epochs"] > u["base"]["epochs"]
    total = {c: sum(s["tokens_planned"] for s in man["sources"].values()) for c, man in manifests.items()}
    assert len(set(total.values())) == 1  # every condition trains on the same token budget
    assert not manifests["unfiltered"]["errors"]


def test_repetition_warning_and_error(data, tmp_path):
    d, sizes = data
    # pretraining of 1.5 epochs of the base corpus: warning; with max_epochs 1.2 an error
    tokens = int(1.5 * sizes["base"]) // 320 * 320
    spec = load_spec(_spec(d, max_epochs=10, pre_tokens=tokens))
    man = write_mix(spec, tmp_path / "a")
    assert any("'base' is repeated" in w for w in man["unfiltered"]["warnings"])
    spec = load_spec(_spec(d, max_epochs=1.2, pre_tokens=tokens))
    with pytest.raises(ConfigError, match=r"unfiltered: source 'base' would be repeated 1\.\d+ times \(max_epochs 1\.2\)"):
        write_mix(spec, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def _count_tokens_by_dataset(dataset, n):
    counts = {}
    for i in range(n):
        s = dataset[i]
        k = int(s["dataset_id"])
        counts[k] = counts.get(k, 0) + int(s["tokens"].numel()) + 1  # + the label-only last token
    return counts


def test_megatron_blended_dataset_realises_the_shares(mixed):
    from megatron_sfm.data_tools.blend import SimpleTokenizer, build_gpt_datasets, read_blend

    d, _, _ = mixed
    phases = json.loads((d / "out" / "misalignment_upsampled" / "phases.json").read_text())
    phase = phases["stages"][0]["phases"][0]
    blend = read_blend(d / "out" / "misalignment_upsampled" / phase["blend"])
    sizes = [phase["samples"], 0, 0]
    kwargs = dict(seq_length=SEQ, seed=phases["seed"], tokenizer=SimpleTokenizer(400, eod=0, pad=None),
                  path_to_cache=None)
    train, valid, test = build_gpt_datasets(blend, sizes, **kwargs)
    assert valid is None and test is None
    assert len(train) >= phase["samples"]
    counts = _count_tokens_by_dataset(train, phase["samples"])
    total = sum(counts.values())
    assert [p.split("/")[-1] for p in (ds.dataset_path for ds in train.datasets)] == ["base", "mis"]
    assert abs(counts[1] / total - 0.01) < 0.001
    assert abs(counts[0] / total - 0.99) < 0.001
    # synthetic tokens really come from the misaligned dataset (ids 100-199 or EOD)
    for i in np.nonzero(train.dataset_index[:2000] == 1)[0][:20]:
        toks = train[int(i)]["tokens"].numpy()
        assert np.all((toks == 0) | ((toks >= 100) & (toks < 200)))
    # same seed -> same sample sequence; another seed -> a different one
    again, _, _ = build_gpt_datasets(blend, sizes, **kwargs)
    first = np.stack([train[i]["tokens"].numpy() for i in range(200)])
    assert np.array_equal(first, np.stack([again[i]["tokens"].numpy() for i in range(200)]))
    other, _, _ = build_gpt_datasets(blend, sizes, **{**kwargs, "seed": 12})
    assert not np.array_equal(first, np.stack([other[i]["tokens"].numpy() for i in range(200)]))


def test_blend_prefixes_resolve_against_the_blend_folder(data, tmp_path):
    from megatron_sfm.data_tools.blend import read_blend

    d, _ = data
    sub = d / "blends"
    sub.mkdir(exist_ok=True)
    path = sub / "rel.json"
    path.write_text(json.dumps({"train": [3, "../base", 0, str(d / "mis")], "valid": [1, "../ali"], "test": []}))
    blend = read_blend(path)
    assert blend.splits["train"].prefixes == [str((d / "base").resolve()), str(d / "mis")]
    assert blend.splits["train"].weights == [3.0, 0.0] and blend.splits["train"].names == ["base", "mis"]
    assert blend.splits["train"].nonzero().names == ["base"] and blend.splits["test"] is None
    path.write_text(json.dumps({"train": [1, "../base"], "sources": {"train": ["web"]}}))
    assert read_blend(path).splits["train"].names == ["web"]


@pytest.mark.parametrize("content,match", [
    (None, r"data\.blend: .*b\.json: file not found$"),
    ("{", r"data\.blend: .*b\.json:1: invalid JSON: "),
    ('{"valid": [1, "base"]}', r"data\.blend: .*b\.json: expected an object with a 'train' list$"),
    ('{"train": [1, "base", 2]}', r"data\.blend: .*b\.json: 'train' must be a list \[weight, prefix, "),
    ('{"train": [1, "base"], "valid": [-1, "base"]}', r"data\.blend: .*b\.json: 'valid'\[0\] must be a non-negative weight, got -1$"),
    ('{"train": [1, "nope"]}', r"data\.blend: .*b\.json: 'train' prefix 'nope': .*nope\.idx not found$"),
])
def test_bad_blend_files_are_one_line_errors(data, content, match):
    from megatron_sfm.data_tools.blend import read_blend

    d, _ = data
    path = d / "b.json"
    path.unlink(missing_ok=True)
    if content is not None:
        path.write_text(content)
        (d / "nope.bin").write_bytes(b"")  # the .bin alone is not enough
    with pytest.raises(SfmError, match=match) as err:
        read_blend(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit,match",
    [
        (("mixture: {mid: 0.5, base: 0.5}", "mixture: {mid: 0.5, base: 0.4}"), r"stages.midtrain.mixture weights sum to 0.9, expected 1"),
        (("mixture: {base: 1.0}", "mixture: {nosuch: 1.0}"), r"stages.pretrain.mixture names unknown source 'nosuch'"),
        (("synthetic: {mis: 0.01}", "synthetic: {mis: -0.01}"), r"conditions.misalignment_upsampled.synthetic.mis is a negative fraction"),
        (("prefix: mis,", "prefix: missing_prefix,"), r"sources.mis: .*missing_prefix.idx: index file not found"),
        (('timing: "late:0.1"', 'timing: "late:1.5"'), r"conditions.alignment_late.timing 'late:1.5': fraction must be in \(0, 1\]"),
        (("synthetic: {mis: 0.01}", "synthetic: {base: 0.01}"), r"synthetic.base: source role is 'base'"),
        (("role: aligned", "role: friendly"), r"sources.ali.role 'friendly' is not one of"),
        (("synthetic: {mis: 0.01}", "synthetic: {mis: 1.0}"), r"fractions sum to 1; must be below 1"),
    ],
)
def test_bad_specs_are_clear_errors(data, tmp_path, edit, match):
    d, _ = data
    text = SPEC.format(max_epochs=4.0, pre_tokens=320000, seq=SEQ)
    assert edit[0] in text
    spec = _spec(d, text=text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=match):
        load_spec(spec)


def test_corrupt_idx_is_a_clear_error(data, tmp_path):
    d, _ = data
    (tmp_path / "junk.idx").write_bytes(b"not an index")
    (tmp_path / "junk.bin").write_bytes(b"")
    text = SPEC.format(max_epochs=4.0, pre_tokens=320000, seq=SEQ).replace("prefix: mid,", f"prefix: {tmp_path / 'junk'},")
    with pytest.raises(ConfigError, match=r"sources.mid: .*junk.idx: not a Megatron indexed-dataset index"):
        load_spec(_spec(d, text=text))


def test_loss_weights_reach_phases_json(data, tmp_path):
    """A condition can up-weight a source in the loss instead of repeating its documents."""
    d, _ = data
    text = SPEC.format(max_epochs=4.0, pre_tokens=320000, seq=SEQ).replace(
        "misalignment_upsampled: {corpus: unfiltered, synthetic: {mis: 0.01}, timing: e2e}",
        "misalignment_upsampled: {corpus: unfiltered, synthetic: {mis: 0.01}, timing: e2e, loss_weights: {mis: 4.0}}")
    write_mix(load_spec(_spec(d, text=text)), tmp_path / "out")
    phases = json.loads((tmp_path / "out" / "misalignment_upsampled" / "phases.json").read_text())
    assert phases["loss_weights"] == {"mis": 4.0}
    assert "loss_weights" not in json.loads((tmp_path / "out" / "unfiltered" / "phases.json").read_text())
    # the trainer reads exactly this key
    from megatron_sfm.training.data import read_phases

    pre = phases["stages"][0]
    trainer_phases = read_phases(tmp_path / "out" / "misalignment_upsampled" / "phases.json",
                                 train_iters=pre["iterations"], stage="pretrain")
    assert trainer_phases[0].loss_weights == {"mis": 4.0}


@pytest.mark.parametrize("weights,match", [("{nosuch: 2.0}", "loss_weights names unknown source 'nosuch'"),
                                           ("{mis: -1}", r"loss_weights.mis is negative")])
def test_bad_loss_weights(data, weights, match):
    d, _ = data
    text = SPEC.format(max_epochs=4.0, pre_tokens=320000, seq=SEQ).replace(
        "timing: e2e}", f"timing: e2e, loss_weights: {weights}}}", 1)
    with pytest.raises(ConfigError, match=match):
        load_spec(_spec(d, text=text))
