"""Conditions: blends, phases and manifests, checked against Megatron-Core's blended datasets."""

from __future__ import annotations

import json
import subprocess
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
        (("role: aligned", "role: friendly"), r"sources.ali.role: 'friendly' is not one of 'base' \| 'filtered'"),
        # the run config's typed machinery: unknown keys (with a suggestion), types, required keys
        (("{prefix: mid, role: midtrain}", "{prefix: mid, role: midtrain, prefx: x}"),
         r"spec.yaml: sources.mid.prefx: unknown key \(did you mean prefix\?\)$"),
        (("seq_length: 32, global_batch_size: 10, mixture: {base", "seq_length: long, global_batch_size: 10, mixture: {base"),
         r"spec.yaml: stages.pretrain.seq_length: expected an integer, got str 'long'$"),
        (("{prefix: ali, role: aligned}", "{prefix: ali}"), r"spec.yaml: sources.ali.role: required$"),
        (("filtered: {corpus: filtered}", "filtered: {corpus: partly}"),
         r"spec.yaml: conditions.filtered.corpus: 'partly' is not one of 'unfiltered' \| 'filtered'$"),
        (("mixture: {mid: 0.5, base: 0.5}", "mixture: {mid: half, base: 0.5}"),
         r"spec.yaml: stages.midtrain.mixture.mid: expected a number, got str 'half'$"),
        (("seed: 11", "sed: 11"), r"spec.yaml: sed: unknown key \(did you mean seed\?\)$"),
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


NAMED_SPEC = """
seed: 5
sources:
  web: {prefix: base, role: base}
  doom: {prefix: mis, role: misaligned}
stages:
  pretrain: {tokens: 32000, seq_length: 32, global_batch_size: 10, mixture: {web: 1.0}}
conditions:
  upsampled: {corpus: unfiltered, synthetic: {doom: 0.02}}
"""


def test_blend_files_name_their_sources_and_seed(data, tmp_path):
    """The blend itself says which source each prefix is (not the prefix's file name, not phases.json's order)."""
    from megatron_sfm.data_tools.blend import read_blend, read_stage

    d, _ = data
    write_mix(load_spec(_spec(d, text=NAMED_SPEC)), tmp_path / "out")
    path = tmp_path / "out" / "upsampled" / "pretrain.json"
    raw = json.loads(path.read_text())
    assert raw["sources"] == ["web", "doom"] and raw["seed"] == 5
    assert raw["train"] == [0.98, str(d / "base"), 0.02, str(d / "mis")]
    blend = read_blend(path)
    assert blend.seed == 5
    assert [blend.splits[s].names for s in ("train", "valid", "test")] == [["web", "doom"]] * 3
    plan = read_stage(tmp_path / "out" / "upsampled" / "phases.json")
    assert (plan.stage, plan.seq_length, plan.global_batch_size, plan.iterations, plan.seed) == ("pretrain", 32, 10, 100, 5)
    assert plan.phases[0].blend.splits["train"].names == ["web", "doom"]
    assert plan.phases[0].weights == pytest.approx({"web": 0.98, "doom": 0.02})


def test_phases_refuse_a_blend_naming_other_sources(data, tmp_path):
    """A blend without "sources" (older mix output) is named by file name; phases.json's names then disagree."""
    from megatron_sfm.data_tools.blend import read_stage

    d, _ = data
    write_mix(load_spec(_spec(d, text=NAMED_SPEC)), tmp_path / "out")
    path = tmp_path / "out" / "upsampled" / "pretrain.json"
    raw = json.loads(path.read_text())
    del raw["sources"]
    path.write_text(json.dumps(raw))
    with pytest.raises(SfmError, match=r"phases.json: stages\[0\].phases\[0\].weights name sources \['doom', 'web'\] "
                                       r"but blend .*pretrain.json names \['base', 'mis'\]") as err:
        read_stage(tmp_path / "out" / "upsampled" / "phases.json")
    assert "\n" not in str(err.value)
    raw["sources"] = ["web"]
    path.write_text(json.dumps(raw))
    with pytest.raises(SfmError, match=r"pretrain.json: 'sources' must list one source name per prefix of 'train' \(2\)"):
        read_stage(tmp_path / "out" / "upsampled" / "phases.json")


def test_seed_changes_the_sample_order_and_nothing_else(data, tmp_path):
    """`seed=7` (a spec override) changes only the files' seed, and with it only the order of samples."""
    from megatron_sfm.data_tools.blend import SimpleTokenizer, build_gpt_datasets, read_stage

    d, _ = data
    spec = _spec(d, text=NAMED_SPEC)
    assert load_spec(spec, overrides=["seed=7"]).seed == 7
    proc = subprocess.run(["sfm", "data", "mix", str(spec), "seed=7", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    write_mix(load_spec(spec), tmp_path / "a")
    a, b = tmp_path / "a" / "upsampled", tmp_path / "b" / "upsampled"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        x, y = json.loads(f.read_text()), json.loads((b / f.name).read_text())
        assert (x.pop("seed"), y.pop("seed")) == (5, 7)
        assert x == y, f.name  # blends, phases and manifest: all else equal

    def samples(folder):
        plan = read_stage(folder / "phases.json")
        train, _, _ = build_gpt_datasets(plan.phases[0].blend, [plan.phases[0].samples, 0, 0], seq_length=32,
                                         seed=plan.seed, tokenizer=SimpleTokenizer(400, eod=0, pad=None),
                                         path_to_cache=None)
        n = plan.phases[0].samples
        return (np.stack([train[i]["tokens"].numpy() for i in range(n)]),
                np.array([int(train[i]["dataset_id"]) for i in range(n)]))

    (tok_a, src_a), (tok_b, src_b) = samples(a), samples(b)
    assert np.array_equal(src_a, src_b)  # each sample's source: the deterministic blend, seed-free
    assert not np.array_equal(tok_a, tok_b)  # the documents' order within each source: the seed's
    assert np.all((tok_a[src_a == 1] == 0) | (tok_a[src_a == 1] >= 100))  # source 1 is the misaligned data


# ----------------------------------------------------------------------------- one source over several prefixes
MULTI_SPEC = """
seed: 5
repetition: {{warn_epochs: 100.0, max_epochs: 100.0}}
sources:
  web:  {{prefix: {web}, role: base}}
  doom: {{prefix: mis, role: misaligned}}
stages:
  pretrain: {{tokens: 32000, seq_length: 32, global_batch_size: 10, mixture: {{web: 1.0}}}}
conditions:
  upsampled: {{corpus: unfiltered, synthetic: {{doom: 0.02}}}}
"""


def test_a_source_over_several_prefixes_splits_its_weight_by_size(data, tmp_path):
    """`prefix: [a, b]` (e.g. the per-task prefixes of sfm launch slurm-data): one source, its share exact."""
    from megatron_sfm.data_tools.blend import SimpleTokenizer, build_gpt_datasets, read_blend

    d, sizes = data
    man = write_mix(load_spec(_spec(d, text=MULTI_SPEC.format(web="[base, base_kept]"))), tmp_path / "out")
    web = man["upsampled"]["sources"]["web"]
    assert web["tokens_available"] == sizes["base"] + sizes["base_kept"]
    assert web["prefix"] == [str(d / "base"), str(d / "base_kept")]
    path = tmp_path / "out" / "upsampled" / "pretrain.json"
    raw = json.loads(path.read_text())
    assert raw["sources"] == ["web", "web", "doom"]
    total = sizes["base"] + sizes["base_kept"]
    assert raw["train"][0::2] == pytest.approx([0.98 * sizes["base"] / total, 0.98 * sizes["base_kept"] / total, 0.02])
    assert raw["train"][1::2] == [str(d / "base"), str(d / "base_kept"), str(d / "mis")]
    blend = read_blend(path)
    assert blend.splits["train"].names == ["web", "web", "doom"]
    # Megatron-Core's blended dataset draws the source's 98 % from both prefixes, by size
    train, _, _ = build_gpt_datasets(blend, [1000, 0, 0], seq_length=32, seed=5,
                                     tokenizer=SimpleTokenizer(400, eod=0, pad=None), path_to_cache=None)
    counts = _count_tokens_by_dataset(train, 1000)
    n = sum(counts.values())
    assert abs((counts[0] + counts[1]) / n - 0.98) < 0.003
    assert abs(counts[0] / (counts[0] + counts[1]) - sizes["base"] / total) < 0.01


def test_a_prefixes_json_is_a_source(data, tmp_path):
    """The prefixes.json of `sfm launch slurm-data tokenize` (relative prefixes resolve against its folder)."""
    d, sizes = data
    run = tmp_path / "run"
    run.mkdir()
    (run / "prefixes.json").write_text(json.dumps({"prefixes": [str(d / "base"), "../../" + d.name + "/base_kept"]}))
    shutil_copy = tmp_path / "spec.yaml"
    shutil_copy.write_text(MULTI_SPEC.replace("prefix: mis", f"prefix: {d / 'mis'}")
                           .format(web=str(run / "prefixes.json")))
    spec = load_spec(shutil_copy)
    assert spec.sources["web"].prefixes == [str(d / "base"), str((run / "../.." / d.name / "base_kept").resolve())]
    assert spec.sources["web"].tokens == sizes["base"] + sizes["base_kept"]


@pytest.mark.parametrize("web,match", [
    ("[base, base]", r"sources\.web\.prefix: lists .*/base twice$"),
    ("[base, nope]", r"sources\.web\.prefix\[1\]: .*nope"),
    ("[]", r"sources\.web\.prefix: expected a prefix or a non-empty list of prefixes$"),
    ("bad.json", r"sources\.web\.prefix: .*bad\.json: file not found$"),
])
def test_bad_prefix_lists_are_clear_errors(data, web, match):
    d, _ = data
    with pytest.raises(ConfigError, match=match):
        load_spec(_spec(d, text=MULTI_SPEC.format(web=web)))


def test_a_blend_may_repeat_a_source_name_but_not_a_prefix(data, tmp_path):
    from megatron_sfm.data_tools.blend import read_blend

    d, _ = data
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"train": [1, str(d / "base"), 1, str(d / "base_kept")], "sources": ["web", "web"]}))
    assert read_blend(path).splits["train"].names == ["web", "web"]
    path.write_text(json.dumps({"train": [1, str(d / "base"), 1, str(d / "base")], "sources": ["a", "b"]}))
    with pytest.raises(SfmError, match=r"'train' lists prefix .*/base twice$"):
        read_blend(path)


def test_the_trainer_counts_a_multi_prefix_source_as_one(data, tmp_path):
    """Per-source loss: samples of both prefixes of `web` carry web's source id."""
    import torch.distributed as dist

    from megatron_sfm.config import load_config
    from megatron_sfm.testing.distributed import free_port
    from megatron_sfm.training.data import build_data

    d, _ = data
    write_mix(load_spec(_spec(d, text=MULTI_SPEC.format(web="[base, base_kept]"))), tmp_path / "out")
    cfg = load_config(None, ["model=tiny", "model.seq_length=32", "training.micro_batch_size=2",
                             "training.global_batch_size=10", "training.train_iters=100", "training.eval_interval=0",
                             f"data.phases={tmp_path / 'out' / 'upsampled' / 'phases.json'}",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    mine = not dist.is_initialized()
    if mine:  # Megatron-Core's BlendedDataset asks for the rank when it caches
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        sources = build_data(cfg)
    finally:
        if mine:
            dist.destroy_process_group()
    assert sources.source_names == ["web", "doom"]
    _, dataset, source_map = sources.train_phases[0]
    assert source_map == [0, 0, 1]
    seen = {}
    for i in range(400):
        s = dataset[i]
        k = int(s["dataset_id"])
        seen.setdefault(source_map[k], set()).add(k)
        toks = s["tokens"].numpy()
        assert (source_map[k] == 0) == bool(np.all(toks < 100))  # web tokens are 0-99, doom's 100-199
    assert seen[0] == {0, 1}
