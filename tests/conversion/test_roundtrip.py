"""from-hf: Hugging Face -> ours -> Hugging Face is bit-identical; training continues from it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from megatron_sfm.testing.distributed import run_distributed

from .conftest import make_hf_model

BODIES = str(Path(__file__).with_name("dist_bodies.py"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_import_layout_and_metadata(hf_tiny, imported_tp2pp2):
    from megatron_sfm.conversion.dcp_reader import DCPReader

    root = imported_tp2pp2
    assert (root / "latest").read_text() == "0\n"
    iter_dir = root / "iter_0000000"
    for name in ("config.yaml", "train_state.json", "manifest.json", "metadata.json", ".metadata", "common.pt"):
        assert (iter_dir / name).exists(), name
    cfg = yaml.safe_load((iter_dir / "config.yaml").read_text())
    assert cfg["parallel"]["tensor_model_parallel_size"] == 2 and cfg["parallel"]["pipeline_model_parallel_size"] == 2
    assert cfg["model"]["padded_vocab_size"] == 512 and cfg["model"]["vocab_size"] == 300  # tokenizer size
    assert cfg["data"]["tokenizer"] == str((hf_tiny / "tokenizer.json").resolve())
    state = json.loads((iter_dir / "train_state.json").read_text())
    assert state["iteration"] == 0 and state["parallel"]["world_size"] == 4
    # Four ranks wrote the tensors; the chunks follow the TP=2 split (qkv rows halved).
    assert len(list(iter_dir.glob("__*_*.distcp"))) >= 4
    reader = DCPReader(iter_dir)
    assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (4, 192, 64)
    chunk_sizes = {sizes for _, sizes in reader.chunks("decoder.layers.self_attention.linear_qkv.weight")}
    assert chunk_sizes == {(1, 96, 64)}
    # The trainer's own checks accept it.
    from megatron_sfm.training.checkpoint import verify_checkpoint

    assert verify_checkpoint(iter_dir)["iteration"] == 0


def test_hf_to_ours_to_hf_is_bit_identical(hf_tiny, imported_tp2pp2, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    out = export_to_hf(imported_tp2pp2, tmp_path / "back")  # tokenizer: data.tokenizer written by from-hf
    original, back = _tensors(hf_tiny), _tensors(out)
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512 and config["sfm_tokenizer_vocab_size"] == 300
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == 300


def test_fp16_pythia_style_roundtrip(tmp_path):
    """Released Pythia weights are fp16: stored as fp32 in our format, exported back to fp16 exactly."""
    from megatron_sfm.conversion import export_to_hf, import_from_hf

    hf = make_hf_model(tmp_path / "hf16", dtype=torch.float16, num_layers=2, seed=3)
    ckpt = import_from_hf(hf, tmp_path / "ckpt", tp=1, pp=1)
    out = export_to_hf(ckpt, tmp_path / "back", dtype="fp16")
    original, back = _tensors(hf), _tensors(out)
    assert set(back) == set(original)
    for key, value in original.items():
        assert value.dtype == torch.float16 and back[key].dtype == torch.float16
        assert torch.equal(back[key], value), key


def test_training_step_continues_from_imported_weights(hf_tiny, imported_tp2pp2):
    """init_from the imported TP=2 PP=2 checkpoint (trainer reshards to TP=1); step-0 loss = HF loss."""
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(11))
    model = AutoModelForCausalLM.from_pretrained(str(hf_tiny), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                tokens[:, 1:].reshape(-1)).item()
    result = run_distributed(f"{BODIES}:train_one_step_from", nproc=1,
                             args={"ckpt": str(imported_tp2pp2), "tokens": tokens.tolist(), "micro_batch_size": 2})
    assert not result["skipped"]
    assert abs(result["loss"] - hf_loss) < 1e-5, (result["loss"], hf_loss)
    assert abs(result["loss_after_update"] - result["loss"]) > 1e-4  # the step changed the weights
