"""torchao float8 linears on Megatron's tensor-parallel layers (emulated GEMMs on CPU).

Emulation (``model.fp8.emulate``) performs the exact float8 casts and scales and does the
products in fp32, so every number here is the float8 recipe's; only the GEMM kernel (a
float8 tensor-core GEMM on a GPU) differs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_sfm.config import FP8Config, ModelConfig, ParallelConfig
from megatron_sfm.errors import SfmError
from megatron_sfm.testing.distributed import run_distributed

BODIES = str(Path(__file__).with_name("dist_bodies.py"))
E4M3_MAX = 448.0
E5M2_MAX = 57344.0


def fp8(**kw) -> FP8Config:
    fields = dict(format="hybrid", backend="torchao", recipe="tensorwise", emulate=True)
    fields.update(kw)
    return FP8Config(**fields)


def tiny(**kw) -> ModelConfig:
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=128,
                  make_vocab_size_divisible_by=64, seq_length=16, precision="fp32", attention_backend="sdpa")
    fields.update(kw)
    return ModelConfig(**fields)


def quantize(t: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    """Tensorwise float8 round trip in float64: scale to the format's range, cast, unscale."""
    t = t.double()
    scale = torch.tensor(fmax / max(t.abs().max().item(), 1e-12), dtype=torch.float32).double()
    return (t * scale).clamp(-fmax, fmax).to(dtype).double() / scale


def column(float8: FP8Config, in_features=64, out_features=96):
    from megatron_sfm.model.builder import transformer_config
    from megatron_sfm.model.float8 import Float8ColumnParallelLinear

    config = transformer_config(tiny(), ParallelConfig(), backend="sdpa")
    return Float8ColumnParallelLinear(in_features, out_features, config=config, init_method=torch.nn.init.normal_,
                                      bias=True, gather_output=False, skip_bias_add=False, float8=float8)


def test_float8_linear_matches_a_float64_tensorwise_reference(single_process_parallel):
    """Forward: e4m3 input and weight, per-tensor scales; backward (hybrid): e5m2 output gradient."""
    torch.manual_seed(0)
    layer = column(fp8())
    x = torch.randn(8, 2, 64, requires_grad=True)
    gy = torch.randn(8, 2, 96)
    y, _ = layer(x)
    (y * gy).sum().backward()
    xq, wq = quantize(x.detach(), torch.float8_e4m3fn, E4M3_MAX), quantize(layer.weight.detach(), torch.float8_e4m3fn, E4M3_MAX)
    ref_y = xq @ wq.T + layer.bias.detach().double()
    gq = quantize(gy, torch.float8_e5m2, E5M2_MAX)
    ref_dx = gq @ wq
    ref_dw = gq.reshape(-1, 96).T @ xq.reshape(-1, 64)
    for ours, ref in ((y.detach(), ref_y), (x.grad, ref_dx), (layer.weight.grad, ref_dw)):
        rel = ((ours.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-6, rel
    # and it is float8, not a full-precision GEMM in disguise
    plain = torch.nn.functional.linear(x.detach(), layer.weight.detach(), layer.bias.detach())
    rel = ((y.detach() - plain).norm() / plain.norm()).item()
    assert 1e-3 < rel < 0.1, rel


def test_format_e4m3_keeps_the_gradient_in_e4m3(single_process_parallel):
    torch.manual_seed(1)
    hybrid = column(fp8(format="hybrid"))
    e4m3 = column(fp8(format="e4m3"))
    e4m3.load_state_dict(hybrid.state_dict())
    x = torch.randn(8, 2, 64)
    gy = torch.randn(8, 2, 96)
    grads, outs = [], []
    for layer in (hybrid, e4m3):
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        (y * gy).sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1])  # the forward is e4m3 in both
    wq = quantize(e4m3.weight.detach(), torch.float8_e4m3fn, E4M3_MAX)
    ref = quantize(gy, torch.float8_e4m3fn, E4M3_MAX) @ wq
    assert ((grads[1].double() - ref).norm() / ref.norm()).item() < 1e-6
    assert not torch.equal(grads[0], grads[1])


def test_model_swaps_exactly_the_four_linears_per_layer_and_keeps_the_checkpoint_layout(single_process_parallel):
    from megatron_sfm.model.builder import build_gpt_model
    from megatron_sfm.model.float8 import float8_linears

    base = build_gpt_model(tiny(), ParallelConfig())
    model = build_gpt_model(tiny(fp8=fp8()), ParallelConfig())
    names = float8_linears(model)
    expected = {f"decoder.layers.{i}.{n}" for i in range(2) for n in
                ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}
    assert set(names) == expected  # embedding and output layer stay in high precision
    assert float8_linears(base) == []
    assert set(model.state_dict()) == set(base.state_dict())
    model.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 128, (2, 17), generator=g)
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = base(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean().item()
        ours = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean().item()
    assert math.isfinite(ours) and ours != ref
    assert abs(ours - ref) / ref < 0.02, (ours, ref)


@pytest.mark.parametrize("args", [{"tp": 2}, {"tp": 2, "sequence_parallel": True, "recipe": "rowwise", "fmt": "e4m3"}],
                         ids=["tp2-tensorwise-hybrid", "tp2-sp-rowwise-e4m3"])
def test_tensor_parallel_float8_pair_equals_torchao_per_shard(args):
    """Column then row parallel at TP=2: outputs and all gradients equal torchao's Float8Linear
    applied shard by shard and summed as tensor parallelism sums (exactly)."""
    out = run_distributed(f"{BODIES}:fp8_mlp_tp", nproc=2, args=args)
    for key in ("y", "x_grad", "w1_grad", "b1_grad", "w2_grad"):
        assert out[key]["ref_max"] > 0.1, key
        assert out[key]["max_abs_diff"] <= 1e-6 * out[key]["ref_max"], (key, out[key])
    assert out["float8_vs_plain_rel"] > 1e-3


def test_tensor_and_sequence_parallel_model_runs_float8_close_to_one_process(single_process_parallel):
    from megatron_sfm.model.builder import build_gpt_model

    tp2 = run_distributed(f"{BODIES}:fp8_model_loss", nproc=2, args={"tp": 2, "sequence_parallel": True})
    assert tp2["float8_linears"] == 16 and tp2["finite_grads"]
    # the same weights (seeded CPU initialisation) in this process at TP=1
    from megatron_sfm.model.parallel import initialize_parallel

    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from dist_bodies import _batches, tiny_model_config

    initialize_parallel(ParallelConfig(), seed=7)
    model = build_gpt_model(tiny_model_config(fp8=fp8(format="e4m3")), ParallelConfig())
    batch = _batches(1, 2)[0]
    with torch.no_grad():
        one = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean().item()
    # per-shard scales differ from whole-tensor scales: close, not equal
    assert abs(tp2["loss"] - one) < 5e-3, (tp2["loss"], one)


def test_builder_picks_torchao_when_asked_and_emulated():
    from megatron_sfm.model.builder import check_fp8

    assert check_fp8(tiny(fp8=fp8())) == "torchao"
    assert check_fp8(tiny(fp8=fp8(backend="auto"))) in ("torchao", "te")


@pytest.mark.parametrize("config,match", [
    (fp8(recipe="delayed"), r"model\.fp8\.recipe: 'delayed' needs Transformer Engine"),
    (fp8(recipe="mxfp8"), r"model\.fp8\.recipe: 'mxfp8'"),
    (fp8(recipe="rowwise", format="hybrid"), r"model\.fp8\.format: torchao's rowwise recipe is e4m3"),
])
def test_unsupported_torchao_settings_are_errors(config, match):
    from megatron_sfm.model.builder import check_fp8

    with pytest.raises(SfmError, match=match):
        check_fp8(tiny(fp8=config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_torchao_without_a_gpu_and_without_emulation_is_an_error():
    from megatron_sfm.model.builder import check_fp8, transformer_config

    model = tiny(fp8=fp8(emulate=False))
    with pytest.raises(SfmError, match=r"model\.fp8: torchao float8 needs a CUDA GPU"):
        check_fp8(model)
    with pytest.raises(SfmError):  # never a bf16 model instead
        transformer_config(model, ParallelConfig(), backend="sdpa")


def test_te_only_settings_with_te_are_errors():
    from megatron_sfm.model.attention import transformer_engine_available
    from megatron_sfm.model.builder import check_fp8

    with pytest.raises(SfmError, match="Transformer Engine|transformer_engine"):
        check_fp8(tiny(fp8=fp8(backend="te")))  # emulate is torchao's; and/or TE is absent
    if not transformer_engine_available():
        with pytest.raises(SfmError, match=r"model\.fp8\.backend: torchao float8 runs on Megatron's own linears"):
            check_fp8(tiny(attention_backend="te", fp8=fp8()))


def test_compiled_float8_matmul_equals_eager(single_process_parallel):
    """``model.fp8.compile`` (the default on CUDA) must not change a number: checked here with
    inductor's CPU backend on the emulated recipe."""
    torch.manual_seed(2)
    eager = column(fp8(compile=False))
    compiled = column(fp8(compile=True))
    compiled.load_state_dict(eager.state_dict())
    assert eager._float8_matmul is not compiled._float8_matmul
    x, gy = torch.randn(8, 2, 64), torch.randn(8, 2, 96)
    results = []
    for layer in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        (y * gy).sum().backward()
        results.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    for ours, ref in zip(results[1], results[0]):
        assert torch.equal(ours, ref)


def test_compiled_matmul_raises_dynamo_recompile_limit():
    """Shapes x recipes x grad modes exceed dynamo's default of 8 graphs; past it float8 would
    silently run eager."""
    import torch._dynamo.config as dynamo_config

    from megatron_sfm.model.float8 import RECOMPILE_LIMIT, _compiled_matmul

    _compiled_matmul()
    limit = getattr(dynamo_config, "recompile_limit", None) or dynamo_config.cache_size_limit
    assert limit >= RECOMPILE_LIMIT >= 16


@pytest.mark.parametrize("field,value,named", [
    ("hidden_size", 72, "model.hidden_size = 72"),
    ("ffn_hidden_size", 136, "model.ffn_hidden_size / TP = 136"),
    ("seq_length", 20, "model.seq_length = 20"),
])
def test_float8_shapes_must_be_multiples_of_16(field, value, named, single_process_parallel):
    """torch._scaled_mm's rule, checked under emulation too so a CPU-valid config is GPU-valid."""
    from megatron_sfm.model.builder import build_gpt_model

    kw = {field: value}
    if field == "hidden_size":
        kw["num_attention_heads"] = 4
    with pytest.raises(SfmError, match=named.replace("/", r"\/")):
        build_gpt_model(tiny(fp8=fp8(), **kw), ParallelConfig())


def test_te_fp8_only_with_te_layers(monkeypatch):
    """With TE importable, TE FP8 needs TE's linears: sdpa attention + backend te is an error,
    and backend auto falls to torchao instead of a silently-bf16 TE config."""
    import megatron_sfm.model.builder as builder

    monkeypatch.setattr(builder, "transformer_engine_available", lambda: True)
    with pytest.raises(SfmError, match="TE's linears"):
        builder.check_fp8(tiny(attention_backend="sdpa", fp8=FP8Config(format="hybrid", backend="te")))
    assert builder.check_fp8(tiny(attention_backend="sdpa", fp8=fp8(backend="auto"))) == "torchao"
    assert builder.check_fp8(tiny(attention_backend="auto", fp8=FP8Config(format="hybrid", backend="auto"))) == "te"
