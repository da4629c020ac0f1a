"""Fast unit tests: config mapping, vocabulary padding, the streaming safetensors writer, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_sfm.config.presets import model_preset
from megatron_sfm.config.schema import ModelConfig
from megatron_sfm.errors import SfmError


def test_hf_config_roundtrip_and_transformers_reads_it(tmp_path):
    from transformers import AutoConfig

    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

    ours = ModelConfig(**model_preset("pythia-6.9b"))
    config = GPTNeoXAdapter.hf_config(ours, ours.padded_vocab(8), "bf16")
    assert config["vocab_size"] == 50432 and config["sfm_tokenizer_vocab_size"] == 50277
    assert config["rotary_pct"] == 0.25 and config["use_parallel_residual"] is True
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoConfig.from_pretrained(str(tmp_path))
    assert hf.vocab_size == 50432 and hf.intermediate_size == 16384 and hf.num_hidden_layers == 32
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25 and hf.rope_parameters["rope_theta"] == 10000.0
    assert hf.use_parallel_residual and not hf.tie_word_embeddings and hf.hidden_act == "gelu"
    back = GPTNeoXAdapter.model_config(config)
    for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_size", "rotary_pct", "rotary_base",
                  "parallel_residual", "layernorm_epsilon", "vocab_size"):
        assert getattr(back, field) == getattr(ours, field), field
    assert back.padded_vocab(1) == back.padded_vocab(8) == 50432  # explicit: independent of TP


def test_vocab_padding_from_hf_uses_tokenizer_size():
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

    released = {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "rotary_pct": 0.25,
                "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu"}
    cfg = GPTNeoXAdapter.model_config(released, tokenizer_vocab_size=50277)
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.rotary_pct) == (50277, 50304, 0.25)
    assert GPTNeoXAdapter.model_config(released).vocab_size == 50304  # no tokenizer: the padded size
    with pytest.raises(SfmError, match="the tokenizer has 60000 tokens but the embedding only 50304"):
        GPTNeoXAdapter.model_config(released, tokenizer_vocab_size=60000)
    with pytest.raises(SfmError, match="hidden_act 'relu'"):
        GPTNeoXAdapter.model_config(dict(released, hidden_act="relu"))
    with pytest.raises(SfmError, match="rope_type 'linear'"):
        GPTNeoXAdapter.model_config(dict(released, rope_scaling={"type": "linear", "factor": 2.0}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streaming_safetensors_matches_the_library(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megatron_sfm.conversion.hf_writer import TensorSpec, write_sharded

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(*shape, generator=gen).to(dtype)
               for i, shape in enumerate([(3, 5), (7,), (2, 3, 4), (1,), (64, 33)])}
    specs = [TensorSpec(k, tuple(v.shape), dtype) for k, v in tensors.items()]
    files = write_sharded(tmp_path, specs, lambda s: tensors[s.name])
    assert files == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == dtype for k, v in tensors.items())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    (tmp_path / "s").mkdir()
    files = write_sharded(tmp_path / "s", specs, lambda s: tensors[s.name], max_shard_bytes=64)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(tensors)  # file order kept
    for name in files:
        shard = load_file(tmp_path / "s" / name)
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert nbytes <= 64 or len(shard) == 1  # only a tensor larger than the limit stands alone
    for key, name in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / "s" / name)[key], tensors[key])


def test_writer_rejects_a_tensor_that_does_not_match_its_plan(tmp_path):
    from megatron_sfm.conversion.hf_writer import TensorSpec, write_sharded

    with pytest.raises(SfmError, match="planned"):
        write_sharded(tmp_path, [TensorSpec("a", (2, 2), torch.float32)], lambda s: torch.zeros(3))


def test_cli_to_hf_and_error_exit(trained, tmp_path, capsys):
    from megatron_sfm.cli import main as sfm

    assert sfm(["convert", "to-hf", str(trained["tp2"]), "--out", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert "sfm convert to-hf" in capsys.readouterr().out
    assert sfm(["convert", "to-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    assert sfm(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "y"), "--tp", "3"]) == 2
    assert "--tp 3: does not divide num_attention_heads 4" in capsys.readouterr().err


def test_cli_options_are_frozen():
    from megatron_sfm.conversion.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    assert {a.dest for a in sub["to-hf"]._actions} == {
        "help", "ckpt_dir", "out", "overwrite", "iteration", "dtype", "tokenizer", "verify", "tolerance",
        "max_shard_size", "verify_checksums"}
    assert {a.dest for a in sub["from-hf"]._actions} == {"help", "hf_dir", "out", "overwrite", "tp", "pp", "dtype"}


def test_hf_weights_reads_lm_head_as_embed_out_and_slices(tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_sfm.conversion.hf_weights import HFWeights

    from .conftest import make_hf_model

    folder = make_hf_model(tmp_path / "hf", num_layers=1)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    weights = HFWeights(folder)
    assert "embed_out.weight" in weights and "lm_head.weight" not in weights
    assert weights.shape("embed_out.weight") == (512, 64) and weights.dtype("embed_out.weight") == torch.float32
    part = weights.get("embed_out.weight", [slice(256, 512), slice(0, 64)])
    assert torch.equal(part, tensors["lm_head.weight"][256:])
    with pytest.raises(SfmError, match="tensor 'gpt_neox.layers.5.mlp.dense_h_to_4h.weight' is missing"):
        weights.get("gpt_neox.layers.5.mlp.dense_h_to_4h.weight")
