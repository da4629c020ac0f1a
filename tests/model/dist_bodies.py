"""Bodies run on every rank by tests in this folder (through run_distributed)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_sfm.config import ModelConfig, ParallelConfig

VOCAB = 128
SEQ = 16


def tiny_model_config(**kw) -> ModelConfig:
    fields = dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  vocab_size=VOCAB, make_vocab_size_divisible_by=64, seq_length=SEQ, precision="fp32",
                  attention_backend="sdpa")
    fields.update(kw)
    return ModelConfig(**fields)


def _batches(n: int, micro_batch: int, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (micro_batch, SEQ + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "position_ids": torch.arange(SEQ).unsqueeze(0).expand(micro_batch, -1)})
    return out


def tp_forward(tp: int) -> dict:
    """Logits (gathered) and mean loss of a tiny model under TP=tp."""
    from megatron.core import tensor_parallel

    from megatron_sfm.model.builder import build_gpt_model
    from megatron_sfm.model.parallel import initialize_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    initialize_parallel(parallel, seed=7)
    model = build_gpt_model(tiny_model_config(), parallel)  # vocab-parallel logits
    batch = _batches(1, 2)[0]
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(
        model(batch["tokens"], batch["position_ids"], None))
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    return {"logits": logits.detach().double().tolist(), "loss": loss.item()}


def _global_name(name: str, offset: int) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + offset)
    return ".".join(parts)


def _init_by_global_name(model, offset: int) -> None:
    import zlib

    with torch.no_grad():
        for name, param in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(_global_name(name, offset).encode()))
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)


def pp_train_step(pp: int, num_microbatches: int = 4) -> dict:
    """Loss and gradients of one forward/backward through Megatron's pipeline schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sfm.model.builder import build_gpt_model
    from megatron_sfm.model.parallel import initialize_parallel

    parallel = ParallelConfig(pipeline_model_parallel_size=pp)
    initialize_parallel(parallel, seed=11)
    cfg = tiny_model_config()
    model = build_gpt_model(cfg, parallel)
    offset = parallel_state.get_pipeline_model_parallel_rank() * (cfg.num_layers // pp)
    _init_by_global_name(model, offset)  # same weights whatever the stage split
    batches = iter(_batches(num_microbatches, 2))
    losses = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            # the schedule divides the returned loss in place: report a copy
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    result = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model],
        num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=2, forward_only=False)
    if parallel_state.is_pipeline_last_stage():
        losses = [r["loss"].item() for r in result]
    grads = {_global_name(n, offset): p.grad.double().flatten().tolist()
             for n, p in model.named_parameters() if p.grad is not None}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"grads": grads, "losses": losses})
    merged: dict = {"grads": {}, "losses": []}
    for part in gathered:
        merged["grads"].update(part["grads"])
        merged["losses"] = merged["losses"] or part["losses"]
    return merged



def fp8_model_loss(tp: int, sequence_parallel: bool = False, fp8: bool = True) -> dict:
    """Loss of the tiny model with torchao float8 linears (emulated) at TP=tp."""
    from megatron_sfm.config import FP8Config
    from megatron_sfm.model.builder import build_gpt_model
    from megatron_sfm.model.float8 import float8_linears
    from megatron_sfm.model.parallel import initialize_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    initialize_parallel(parallel, seed=7)
    fp8_config = FP8Config(format="e4m3", backend="torchao", recipe="tensorwise", emulate=True) if fp8 else FP8Config()
    model = build_gpt_model(tiny_model_config(fp8=fp8_config), parallel)
    batch = _batches(1, 2)[0]
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    loss.backward()
    grad_norm = sum(p.grad.double().pow(2).sum() for p in model.parameters()).sqrt().item()
    return {"loss": loss.item(), "float8_linears": len(float8_linears(model)),
            "finite_grads": math.isfinite(grad_norm) and grad_norm > 0}


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def fp8_mlp_tp(tp: int, sequence_parallel: bool = False, recipe: str = "tensorwise", fmt: str = "hybrid") -> dict:
    """A column-parallel then row-parallel float8 pair at TP=tp, against torchao per shard.

    The reference is built on every rank from torchao's own ``Float8Linear`` (one per
    weight shard, as each rank quantizes only what it holds) and summed the way tensor
    parallelism sums: if our layers do their communication right, the output and every
    gradient match it to rounding.
    """
    from megatron.core import parallel_state
    from torchao.float8.float8_linear import Float8Linear

    from megatron_sfm.config import FP8Config
    from megatron_sfm.model.builder import transformer_config
    from megatron_sfm.model.float8 import Float8ColumnParallelLinear, Float8RowParallelLinear, torchao_config
    from megatron_sfm.model.parallel import initialize_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    initialize_parallel(parallel, seed=7)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    fp8 = FP8Config(format=fmt, backend="torchao", recipe=recipe, emulate=True)
    config = transformer_config(tiny_model_config(), parallel, backend="sdpa")
    init = torch.nn.init.zeros_
    col = Float8ColumnParallelLinear(64, 128, config=config, init_method=init, bias=True, gather_output=False,
                                     skip_bias_add=False, float8=fp8)
    row = Float8RowParallelLinear(128, 64, config=config, init_method=init, bias=True, input_is_parallel=True,
                                  skip_bias_add=False, float8=fp8)
    g = torch.Generator().manual_seed(5)
    w1, b1 = torch.randn(128, 64, generator=g) * 0.1, torch.randn(128, generator=g) * 0.1
    w2, b2 = torch.randn(64, 128, generator=g) * 0.1, torch.randn(64, generator=g) * 0.1
    x = torch.randn(8, 2, 64, generator=g)
    gy = torch.randn(8, 2, 64, generator=g)
    with torch.no_grad():
        col.weight.copy_(w1.chunk(tp, 0)[rank]); col.bias.copy_(b1.chunk(tp, 0)[rank])
        row.weight.copy_(w2.chunk(tp, 1)[rank]); row.bias.copy_(b2)
    x_local = (x.chunk(tp, 0)[rank] if sequence_parallel else x).clone().requires_grad_(True)
    h, _ = col(x_local)
    y, _ = row(h)
    (y * (gy.chunk(tp, 0)[rank] if sequence_parallel else gy)).sum().backward()
    if sequence_parallel:
        y, x_grad = _gather(y.detach(), 0, group), _gather(x_local.grad, 0, group)
    else:
        y, x_grad = y.detach(), x_local.grad
    ours = {"y": y, "x_grad": x_grad, "w1_grad": _gather(col.weight.grad, 0, group),
            "b1_grad": _gather(col.bias.grad, 0, group), "w2_grad": _gather(row.weight.grad, 1, group)}

    # torchao reference: one Float8Linear per shard, partial outputs summed in rank order
    config_ao = torchao_config(fp8)
    xr = x.clone().requires_grad_(True)
    pairs, total = [], None
    for r in range(tp):
        first = torch.nn.Linear(64, 128 // tp)
        second = torch.nn.Linear(128 // tp, 64, bias=False)
        with torch.no_grad():
            first.weight.copy_(w1.chunk(tp, 0)[r]); first.bias.copy_(b1.chunk(tp, 0)[r])
            second.weight.copy_(w2.chunk(tp, 1)[r])
        first, second = Float8Linear.from_float(first, config_ao), Float8Linear.from_float(second, config_ao)
        pairs.append((first, second))
        part = second(first(xr))
        total = part if total is None else total + part
    ref_y = total + b2
    (ref_y * gy).sum().backward()
    ref = {"y": ref_y.detach(), "x_grad": xr.grad, "w1_grad": torch.cat([f.weight.grad for f, _ in pairs], 0),
           "b1_grad": torch.cat([f.bias.grad for f, _ in pairs], 0),
           "w2_grad": torch.cat([s.weight.grad for _, s in pairs], 1)}
    plain = (torch.nn.functional.linear(torch.nn.functional.linear(x, w1, b1), w2, b2))
    out = {}
    for key in ours:
        diff = (ours[key] - ref[key]).abs().max().item()
        out[key] = {"max_abs_diff": diff, "ref_max": ref[key].abs().max().item()}
    out["float8_vs_plain_rel"] = ((ref["y"] - plain).norm() / plain.norm()).item()
    return out
