"""megatron_sfm/posttrain/config.py: stage configs from YAML, overrides and the command line."""

from __future__ import annotations

import pytest

from megatron_sfm.errors import ConfigError
from megatron_sfm.posttrain.config import (
    DataFile,
    DPOConfig,
    SFTConfig,
    load_stage_config,
    parse_data_spec,
)


def test_precedence_file_then_overrides_then_command_line(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: from-file\nout: file-out\nlearning_rate: 1e-5\nmax_steps: 7\n"
                    "data: [a.jsonl:2, {path: b.parquet, weight: 0.5}, c.jsonl]\n")
    cfg = load_stage_config("sft", path, ["max_steps=9", "seed=3"], out="cli-out")
    assert isinstance(cfg, SFTConfig)
    assert (cfg.model, cfg.out, cfg.learning_rate, cfg.max_steps, cfg.seed) == ("from-file", "cli-out", 1e-5, 9, 3)
    assert cfg.data == [DataFile("a.jsonl", 2.0), DataFile("b.parquet", 0.5), DataFile("c.jsonl", 1.0)]
    cfg = load_stage_config("sft", path, ["data=[x.jsonl]"], data=["y.jsonl:3"], model="m")
    assert cfg.data == [DataFile("y.jsonl", 3.0)] and cfg.model == "m"
    assert cfg.assistant_only_loss and cfg.chat_template == "sfm-chatml" and cfg.bf16 is None


def test_dpo_fields_and_defaults():
    cfg = load_stage_config("dpo", None, ["beta=0.2", "loss_type=ipo", "max_prompt_length=64"],
                            model="m", out="o", data=["p.jsonl"])
    assert isinstance(cfg, DPOConfig)
    assert (cfg.beta, cfg.loss_type, cfg.max_prompt_length, cfg.learning_rate) == (0.2, "ipo", 64, 5e-7)


@pytest.mark.parametrize("text, overrides, expected", [
    ("lerning_rate: 1e-5\n", [], "{file}: lerning_rate: unknown key (did you mean learning_rate?)"),
    ("max_steps: many\n", [], "{file}: max_steps: expected an integer, got str 'many'"),
    ("data: [{path: a.jsonl, wieght: 2}]\n", [], "{file}: data[0].wieght: unknown key (did you mean weight?)"),
    ("lr_scheduler_type: cosin\n", [], "{file}: lr_scheduler_type: 'cosin' is not one of"),
    ("", ["beta=0.1"], "beta: unknown key"),  # a DPO field in an SFT config
    ("", ["training.lr=1"], "training.lr: stage configs have no sections"),
    ("", ["max_steps=0"], "max_steps: must be -1 (use num_train_epochs) or at least 1, got 0"),
    ("", ["data=[{path: a.jsonl, weight: 0}]"], "data[0].weight: must be a positive number, got 0.0"),
    ("", ["warmup_ratio=1.5"], "warmup_ratio: must be in [0, 1), got 1.5"),
])
def test_errors_name_the_file_and_key(tmp_path, text, overrides, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "model: m\nout: o\n")
    data = None if any(o.startswith("data=") for o in overrides) else ["d.jsonl"]
    with pytest.raises(ConfigError) as err:
        load_stage_config("sft", path, overrides, data=data)
    assert str(err.value).startswith(expected.format(file=path)), str(err.value)


def test_required_values_and_dpo_checks():
    with pytest.raises(ConfigError, match=r"^data: required \(give --data"):
        load_stage_config("sft", None, [], model="m", out="o")
    with pytest.raises(ConfigError, match=r"^out: required"):
        load_stage_config("sft", None, [], model="m", data=["d.jsonl"])
    with pytest.raises(ConfigError, match=r"^max_prompt_length: 512 leaves no room"):
        load_stage_config("dpo", None, ["max_prompt_length=512", "max_length=512"], model="m", out="o",
                          data=["d.jsonl"])
    with pytest.raises(ConfigError, match=r"^stage 'ppo'"):
        load_stage_config("ppo", None, [], model="m", out="o", data=["d.jsonl"])


def test_parse_data_spec():
    assert parse_data_spec("a.jsonl") == DataFile("a.jsonl", 1.0)
    assert parse_data_spec("a.jsonl:0.25") == DataFile("a.jsonl", 0.25)
    assert parse_data_spec("dir:x/a.jsonl") == DataFile("dir:x/a.jsonl", 1.0)  # not a number: part of the path
    assert parse_data_spec("dir:x/a.jsonl:3") == DataFile("dir:x/a.jsonl", 3.0)


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_paper_scale_examples_load_and_mark_assumptions(kind):
    path = REPO / f"examples/pythia-6.9b/posttrain-{kind}.yaml"
    cfg = load_stage_config(kind, path, [], model="hf/x", out="o", data=["d.jsonl"])
    assert cfg.bf16 is True and cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 8 == 128
    for line in path.read_text().splitlines():  # each training value says it is an assumption
        if line and not line.startswith("#") and ":" in line:
            assert "# assumption:" in line or "# operational" in line or "gradient_checkpointing" in line, line


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    for name in ("fsdp.yaml", "fsdp-multinode.yaml"):
        cfg = ClusterConfig.from_yaml_file(REPO / "examples/accelerate" / name)
        assert str(cfg.distributed_type).endswith("FSDP") and cfg.mixed_precision == "bf16"
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "GPTNeoXLayer"
    tiny = load_stage_config("dpo", REPO / "examples/posttrain/tiny.yaml", [], model="m", out="o",
                             data=["d.jsonl"])
    assert tiny.max_steps == 12 and tiny.bf16 is False
