"""Backend and FP8 choices: nothing silently falls back."""

import pytest

from megatron_sfm.config import ModelConfig, FP8Config, ParallelConfig
from megatron_sfm.errors import SfmError
from megatron_sfm.model.attention import resolve_backend, transformer_engine_available
from megatron_sfm.model.builder import check_fp8, transformer_config


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is importable here")
def test_te_backend_without_transformer_engine_is_an_error():
    with pytest.raises(SfmError, match="transformer_engine"):
        resolve_backend("te")


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is importable here")
def test_auto_picks_sdpa_without_transformer_engine(caplog):
    caplog.set_level("INFO")
    assert resolve_backend("auto") == "sdpa"
    assert "auto -> sdpa" in caplog.text


def test_unknown_backend_is_an_error():
    with pytest.raises(SfmError, match="attention_backend"):
        resolve_backend("flash9")


@pytest.mark.parametrize("backend", ["auto", "te", "torchao"])
def test_fp8_without_a_backend_is_an_error(backend):
    model = ModelConfig(fp8=FP8Config(format="hybrid", backend=backend))
    if transformer_engine_available():
        pytest.skip("Transformer Engine is importable here")
    with pytest.raises(SfmError, match="transformer_engine|torchao"):
        check_fp8(model)
    # and the Megatron config is never built in bf16 instead
    with pytest.raises(SfmError):
        transformer_config(model, ParallelConfig(), backend="sdpa")


def test_fp8_off_builds_a_plain_config():
    cfg = transformer_config(ModelConfig(precision="fp32"), ParallelConfig(), backend="sdpa")
    assert not cfg.fp8
