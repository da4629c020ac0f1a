"""Bodies run on every rank by tests in this folder (through run_distributed)."""

from __future__ import annotations

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
