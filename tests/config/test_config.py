"""Typed configs: YAML, overrides, presets and validation errors that name the key."""

import textwrap

import pytest

from megatron_sfm.config import load_config, validate_run_config, PRESETS, dump_config
from megatron_sfm.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_preset_and_overrides(tmp_path):
    path = write(tmp_path, """
        model: {preset: pythia-160m, seq_length: 1024}
        training: {micro_batch_size: 2, global_batch_size: 16}
    """)
    cfg = load_config(path, ["training.train_iters=7", "optimizer.lr=1e-4", "model.attention_backend=local"])
    assert cfg.model.num_layers == 12 and cfg.model.hidden_size == 768
    assert cfg.model.seq_length == 1024
    assert cfg.training.train_iters == 7
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.model.attention_backend == "local"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model=pythia-410m", "training.train_iters=3"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize("override,needle", [
    ("model.hiden_size=3", "model.hiden_size: unknown key"),
    ("training.train_iters=ten", "training.train_iters: expected an integer"),
    ("model.attention_backend=flash", "model.attention_backend"),
    ("model.parallel_residual=3", "model.parallel_residual: expected true or false"),
    ("model.preset=pythia-9b", "unknown preset"),
    ("training.train_iters", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(None, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+"):
        load_config(path)
    path = write(tmp_path, "model:\n  num_heads: 4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.num_heads: unknown key"):
        load_config(path)


@pytest.mark.parametrize("overrides,world,needle", [
    (["model.hidden_size=100", "model.num_attention_heads=8"], None, "num_attention_heads: 8 heads do not divide"),
    (["parallel.tensor_model_parallel_size=3"], None, "TP=3 does not divide model.num_attention_heads"),
    (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], None, "PP=2 does not divide"),
    (["training.global_batch_size=12", "training.micro_batch_size=4"], 2, "not divisible by micro_batch_size x data-parallel"),
    (["model.padded_vocab_size=100", "model.vocab_size=512"], None, "smaller than model.vocab_size"),
    (["model.padded_vocab_size=514", "parallel.tensor_model_parallel_size=4"], None, "does not divide the padded vocabulary"),
])
def test_layout_validation(overrides, world, needle):
    cfg = load_config(None, ["model=tiny"] + overrides)
    with pytest.raises(ConfigError, match=needle):
        validate_run_config(cfg, world_size=world)


def test_every_preset_validates():
    for name in PRESETS:
        validate_run_config(load_config(None, [f"model.preset={name}"]))


def test_padded_vocab_is_megatron_style():
    cfg = load_config(None, ["model=tiny", "model.vocab_size=50277", "model.make_vocab_size_divisible_by=128"])
    assert cfg.model.padded_vocab(1) == 50304
    assert cfg.model.padded_vocab(2) == 50432
    assert cfg.model.padded_vocab(8) == 51200
