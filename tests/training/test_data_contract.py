"""The mix -> trainer contract: sizes checked against the stage, one seed, every dataset checked first."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from training_corpus import write_source
from training_helpers import run_train, write_config

from megatron_sfm.config import load_config
from megatron_sfm.errors import SfmError

MIX = {
    "seed": 3,
    "repetition": {"warn_epochs": 1000.0, "max_epochs": 1000.0},
    "sources": {"web": {"prefix": "train/web", "role": "base"},
                "doom": {"prefix": "train/aligned", "role": "misaligned"}},
    "stages": {"pretrain": {"tokens": 6 * 8 * 64, "seq_length": 64, "global_batch_size": 8,
                            "mixture": {"web": 1.0}}},
    "conditions": {"upsampled": {"synthetic": {"doom": 0.25}}},
}


def _mix(corpus: Path, out: Path, **changes) -> Path:
    """``sfm data mix`` over the training corpus; returns the condition's phases.json."""
    from megatron_sfm.data_tools.mix import load_spec, write_mix

    spec = corpus.parent / f"mix-{out.name}.yaml"
    spec.write_text(yaml.safe_dump({**MIX, **changes}))
    write_mix(load_spec(spec), out)
    return out / "upsampled" / "phases.json"


def _cfg(phases: Path, *overrides: str):
    return load_config(None, ["model=tiny", "model.precision=fp32", "training.micro_batch_size=2",
                              "training.global_batch_size=8", "training.train_iters=6", f"data.phases={phases}",
                              *overrides])


@pytest.fixture(scope="module")
def mixed(corpus, tmp_path_factory):
    return _mix(corpus, tmp_path_factory.mktemp("mix") / "out")


@pytest.mark.parametrize("overrides,match", [
    (["training.train_iters=7"], r"stage 'pretrain' was mixed for other sizes: training\.train_iters=7 \(stage: 6\); "),
    (["training.global_batch_size=4", "model.seq_length=32"],
     r".*other sizes: training\.global_batch_size=4 \(stage: 8\), model\.seq_length=32 \(stage: 64\); "),
])
def test_sizes_must_match_the_stage(mixed, overrides, match):
    from megatron_sfm.training.data import build_data

    with pytest.raises(SfmError, match=r"^data\.phases: .*phases\.json: " + match) as err:
        build_data(_cfg(mixed, *overrides))
    assert "\n" not in str(err.value)


def test_split_seed_cannot_contradict_the_mix_seed(mixed):
    from megatron_sfm.training.data import build_data

    with pytest.raises(SfmError, match=r"^data\.split_seed: 99 differs from the seed 3 of .*phases\.json "):
        build_data(_cfg(mixed, "data.split_seed=99"))


@pytest.fixture
def process_group():
    import torch.distributed as dist

    from megatron_sfm.testing.distributed import free_port

    mine = not dist.is_initialized()
    if mine:  # Megatron-Core's BlendedDataset asks for the rank when it caches
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if mine:
        dist.destroy_process_group()


def test_the_mix_seed_orders_the_trainers_samples(corpus, tmp_path, process_group):
    """The spec's seed reaches the trainer's datasets: another seed, another order (same sources per sample)."""
    from megatron_sfm.data_tools.blend import (
        SimpleTokenizer,
        build_gpt_datasets,
        read_stage,
    )
    from megatron_sfm.training.data import build_data

    def trainer_samples(phases, *overrides):
        data = build_data(_cfg(phases, f"data.cache_dir={tmp_path / 'cache' / phases.parent.parent.name}",
                               *overrides))
        (_, ds, smap), = data.train_phases
        return (np.stack([ds[i]["tokens"].numpy() for i in range(48)]),
                [data.source_names[smap[int(ds[i]["dataset_id"])]] for i in range(48)])

    seed3, seed4 = _mix(corpus, tmp_path / "s3"), _mix(corpus, tmp_path / "s4", seed=4)
    tokens3, sources3 = trainer_samples(seed3)
    tokens4, sources4 = trainer_samples(seed4)
    assert sources3 == sources4 and set(sources3) == {"web", "doom"}
    assert not np.array_equal(tokens3, tokens4)
    # exactly Megatron's datasets at the spec's seed (data.split_seed unset; equal to it is fine too)
    plan = read_stage(seed4)
    ref, _, _ = build_gpt_datasets(plan.phases[0].blend, [48, 0, 0], seq_length=64, seed=4,
                                   tokenizer=SimpleTokenizer(512, eod=0, pad=None), path_to_cache=None)
    assert np.array_equal(tokens4, np.stack([ref[i]["tokens"].numpy() for i in range(48)]))
    assert np.array_equal(trainer_samples(seed4, "data.split_seed=4")[0], tokens4)


# ----------------------------------------------------------------------------- dataset checks


def _dataset(folder: Path, name: str = "web", **kw) -> str:
    return write_source(folder / name, 1, num_docs=8, doc_len=50, **kw)


def test_sidecar_gives_the_largest_id_without_a_scan(tmp_path, caplog):
    from megatron_sfm.training.data_checks import check_datasets, dataset_stats

    prefix = _dataset(tmp_path)  # ids in 0..511
    largest = int(np.fromfile(prefix + ".bin", np.uint16).max())
    with caplog.at_level(logging.WARNING, logger="megatron_sfm.training.data_checks"):
        stats = dataset_stats(prefix)
    assert (stats.max_token_id, stats.min_token_id, stats.from_sidecar, stats.num_tokens) == (largest, 0, False, 8 * 51)
    assert "no " + prefix + ".stats.json: scanned 408 tokens" in caplog.text
    sidecar = Path(prefix + ".stats.json")
    # the sidecar is believed (here it claims a larger id than the data has)
    sidecar.write_text(json.dumps({"max_token_id": 700, "num_tokens": 408, "num_documents": 8, "dtype": "uint16"}))
    with pytest.raises(SfmError, match=rf"^data check: {prefix}\.bin: token id 700 >= model\.vocab_size 512 "
                                       rf"\(largest id, from {sidecar}; a dataset of blend\.json\)"):
        check_datasets([(prefix, "blend.json")], 512)
    # a stale sidecar (other token count) is not: the .bin is scanned
    sidecar.write_text(json.dumps({"max_token_id": 700, "num_tokens": 999, "num_documents": 8, "dtype": "uint16"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_sfm.training.data_checks"):
        (stats,) = check_datasets([(prefix, "blend.json")], 512)
    assert stats.max_token_id == largest and not stats.from_sidecar and "stale" in caplog.text


def _train_error(tmp_path: Path, prefix: str) -> tuple[int, str]:
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": [1.0, prefix], "sources": ["web"]}))
    proc = run_train(write_config(tmp_path / "cfg.yaml", blend, training={"train_iters": 2}), timeout=240)
    return proc.returncode, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


@pytest.mark.parametrize("case", ["out_of_vocab", "truncated_bin", "missing_idx"])
def test_sfm_train_refuses_a_bad_dataset_before_the_first_step(tmp_path, case):
    prefix = _dataset(tmp_path / "data", vocab=600 if case == "out_of_vocab" else 512)
    if case == "truncated_bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(Path(prefix + ".bin").stat().st_size - 10)
    if case == "missing_idx":
        Path(prefix + ".idx").unlink()
    largest = int(np.fromfile(prefix + ".bin", np.uint16).max()) if case == "out_of_vocab" else None
    code, last = _train_error(tmp_path, prefix)
    assert code == 2, last
    expected = {
        "out_of_vocab": rf"^error: data check: {prefix}\.bin: token id {largest} >= model\.vocab_size 512 \(largest id, "
                        rf"from {prefix}\.bin; a dataset of .*blend\.json\)",
        "truncated_bin": rf"^error: data check: {prefix}\.bin: 806 bytes but the index describes 816 "
                         rf"\(a dataset of .*blend\.json\)$",
        "missing_idx": rf"^error: data\.blend: .*blend\.json: 'train' prefix '{prefix}': {prefix}\.idx not found$",
    }[case]
    assert re.search(expected, last), last
    assert "Traceback" not in last


def test_every_phase_dataset_is_checked(corpus, tmp_path):
    """A bad dataset in the second phase (or only in 'valid') stops the run before anything is built."""
    from megatron_sfm.training.data import build_data

    folder = tmp_path / "c"
    shutil.copytree(corpus.parent, folder)
    bad = _dataset(folder / "bad", "late", vocab=600)
    largest = int(np.fromfile(bad + ".bin", np.uint16).max())
    assert largest >= 512
    (folder / "p0.json").write_text(json.dumps({"train": [1.0, "train/web"], "valid": [1.0, "valid/web"]}))
    (folder / "p1.json").write_text(json.dumps({"train": [1.0, "train/web", 1.0, bad]}))
    phases = folder / "phases.json"
    phases.write_text(json.dumps({"phases": [{"start_iteration": 0, "blend": "p0.json"},
                                             {"start_iteration": 3, "blend": "p1.json"}]}))
    with pytest.raises(SfmError, match=rf"data check: {bad}\.bin: token id {largest} >= model\.vocab_size 512 .*p1\.json"):
        build_data(_cfg(phases))


def _blend_cfg(tmp_path: Path, prefix: str):
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": [1.0, prefix], "sources": ["web"]}))
    return blend


def test_bad_data_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from megatron_sfm.training import state as training_state

    prefix = _dataset(tmp_path / "data", vocab=600)
    blend = _blend_cfg(tmp_path, prefix)
    cfg = load_config(None, ["model=tiny", "model.precision=fp32", "training.micro_batch_size=2",
                             "training.global_batch_size=8", "training.train_iters=2", f"data.blend={blend}"])

    def no_model(_cfg):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(training_state, "build_model_chunks", no_model)
    with pytest.raises(SfmError, match=rf"^data check: {prefix}\.bin: token id \d+ >= model\.vocab_size 512 "):
        training_state.build_training_state(cfg)


def test_two_ranks_scan_once_and_both_stop(tmp_path):
    """Without a sidecar the .bin is scanned by rank 0 only; both ranks stop with its error."""
    prefix = _dataset(tmp_path / "data", vocab=600)
    blend = _blend_cfg(tmp_path, prefix)
    proc = run_train(write_config(tmp_path / "cfg.yaml", blend, training={"train_iters": 2}), nproc=2, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count(f"no {prefix}.stats.json: scanned") == 1, proc.stderr[-3000:]
    assert proc.stderr.count(f"error: data check: {prefix}.bin: token id") == 2, proc.stderr[-3000:]
