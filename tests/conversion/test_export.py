"""to-hf on checkpoints written by ``sfm train`` at TP=1 PP=1, TP=2 and PP=2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sfm.testing.distributed import run_distributed

BODIES = str(Path(__file__).with_name("dist_bodies.py"))
TOKENS = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(7))


def _hf_logits(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model, model(input_ids=TOKENS).logits


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2", "pp2"])
def test_sfm_train_checkpoint_exports_and_matches(trained, tmp_path, layout):
    from megatron_sfm.conversion import export_to_hf

    out = export_to_hf(trained[layout], tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["use_parallel_residual"] is True and config["rotary_pct"] == 0.25
    assert config["vocab_size"] == 512 and config["num_hidden_layers"] == 4
    assert (out / "generation_config.json").exists()
    model, hf = _hf_logits(out)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25

    # Reference: Megatron-Core's GPTModel at TP=1 PP=1 loaded by dist_checkpointing.load
    # (Megatron's own reader, resharding the saved layout), not by the export's reader.
    from megatron_sfm.checkpoint_format import resolve_checkpoint
    from megatron_sfm.conversion.verify import megatron_logits

    ours = megatron_logits(resolve_checkpoint(trained[layout]), TOKENS).numpy()
    assert ours.shape == tuple(hf.shape) == (3, 24, 512)
    assert np.abs(ours).max() > 0.1  # non-trivial logits
    assert np.abs(ours - hf.numpy()).max() < 1e-4

    # generate runs, and its first greedy token is our model's argmax.
    with torch.no_grad():
        generated = model.generate(TOKENS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 29)
    assert generated[0, 24].item() == int(ours[0, -1].argmax())


def test_tp2_export_matches_the_tp2_model_itself(trained, tmp_path):
    """The exported model equals the TP=2 model at its own layout (logits gathered over TP)."""
    from megatron_sfm.conversion import export_to_hf

    out = export_to_hf(trained["tp2"], tmp_path / "hf")
    _, hf = _hf_logits(out)
    tp2 = np.array(run_distributed(f"{BODIES}:layout_logits", nproc=2,
                                   args={"ckpt": str(trained["tp2"]), "tokens": TOKENS.tolist(), "tp": 2})["logits"])
    assert np.abs(tp2 - hf.numpy()).max() < 1e-4


def test_verify_flag_passes_and_records(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    out = export_to_hf(trained["pp2"], tmp_path / "hf", verify=True)
    result = json.loads((out / "sfm_verify.json").read_text())
    assert result["passed"] and result["max_abs_logit_diff"] < 1e-4
    assert result["max_abs_logit"] > 0.1
    assert len(result["greedy_generation"]) == 12


def test_verify_fails_above_tolerance(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf
    from megatron_sfm.errors import SfmError

    # bf16 weights compared at a tolerance below bf16 arithmetic noise is still fine
    # (both sides use the same rounded weights), so force a failure with tolerance 0 on
    # a model whose two implementations differ by float rounding.
    with pytest.raises(SfmError, match="exceeds the tolerance"):
        export_to_hf(trained["tp1pp1"], tmp_path / "hf", verify=True, verify_tolerance=0.0)
    assert not (tmp_path / "hf").exists()  # a failed verification leaves no folder


def test_bf16_export_is_rounded_fp32(trained, tmp_path):
    from safetensors.torch import load_file

    from megatron_sfm.conversion import export_to_hf

    fp32 = load_file(export_to_hf(trained["tp2"], tmp_path / "fp32") / "model.safetensors")
    out = export_to_hf(trained["tp2"], tmp_path / "bf16", dtype="bf16", verify=True)
    bf16 = load_file(out / "model.safetensors")
    assert set(bf16) == set(fp32)
    for key, value in bf16.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, fp32[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_export_with_index(trained, tmp_path):
    from safetensors.torch import load_file

    from megatron_sfm.conversion import export_to_hf

    single = load_file(export_to_hf(trained["tp1pp1"], tmp_path / "one") / "model.safetensors")
    out = export_to_hf(trained["tp1pp1"], tmp_path / "many", max_shard_bytes=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    for name in files:
        assert (out / name).stat().st_size <= 400_000 + 20_000  # data limit plus the header
    merged = {}
    for name in files:
        merged.update(load_file(out / name))
    assert set(merged) == set(single) == set(index["weight_map"])
    assert all(torch.equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    _, hf = _hf_logits(out)  # transformers loads the sharded folder
    assert hf.shape == (3, 24, 512)


def test_iteration_selection(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf
    from megatron_sfm.errors import SfmError

    out = export_to_hf(trained["tp1pp1"], tmp_path / "a", iteration=1)
    assert json.loads((out / "sfm_export.json").read_text())["iteration"] == 1
    with pytest.raises(SfmError, match="no checkpoint for iteration 7"):
        export_to_hf(trained["tp1pp1"], tmp_path / "b", iteration=7)


def test_tokenizer_json_is_saved_with_the_export(trained, tmp_path):
    from transformers import AutoTokenizer

    from megatron_sfm.conversion import export_to_hf
    from megatron_sfm.errors import SfmError

    from .conftest import make_tokenizer

    make_tokenizer(300).backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = export_to_hf(trained["tp2"], tmp_path / "hf", tokenizer=str(tmp_path / "tokenizer.json"))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512 and config["sfm_tokenizer_vocab_size"] == 300
    assert config["eos_token_id"] == 0 and config["bos_token_id"] == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok("the aligned model")["input_ids"]) == "the aligned model"
    make_tokenizer(600).backend_tokenizer.save(str(tmp_path / "big.json"))
    with pytest.raises(SfmError, match="has 6[0-9][0-9] tokens, more than the model's 512 embedding rows"):
        export_to_hf(trained["tp2"], tmp_path / "hf2", tokenizer=str(tmp_path / "big.json"))
