"""Bodies run on gloo ranks by run_distributed (tests/conversion)."""

from __future__ import annotations


def layout_logits(ckpt: str, tokens: list, tp: int = 1, pp: int = 1) -> dict:
    """Logits of our GPTModel at (tp, pp=1) loaded with the trainer's loader (gathered over TP)."""
    import torch

    from megatron_sfm.config.loader import load_config
    from megatron_sfm.model.builder import build_gpt_model
    from megatron_sfm.model.parallel import initialize_parallel
    from megatron_sfm.training.checkpoint import load_model_weights, resolve_checkpoint

    folder = resolve_checkpoint(ckpt)
    cfg = load_config(folder / "config.yaml", [f"parallel.tensor_model_parallel_size={tp}",
                                               f"parallel.pipeline_model_parallel_size={pp}"])
    initialize_parallel(cfg.parallel, seed=0)
    model = build_gpt_model(cfg.model, cfg.parallel, parallel_output=False)
    load_model_weights([model], folder)
    model.eval()
    ids = torch.tensor(tokens)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, pos, None)
    return {"logits": logits.float().tolist()}


def train_one_step_from(ckpt: str, tokens: list, micro_batch_size: int) -> dict:
    """Midtraining start: init_from ``ckpt``, then one train_step on ``tokens`` (given batch).

    Returns the step's reported loss (computed before the update, i.e. with the imported
    weights) and the loss of a second forward after the update.
    """
    import torch

    from megatron_sfm.config.loader import load_config
    from megatron_sfm.training.checkpoint import CheckpointManager, resolve_checkpoint
    from megatron_sfm.training.state import build_training_state
    from megatron_sfm.training.step import train_step

    folder = resolve_checkpoint(ckpt)
    ids = torch.tensor(tokens)
    n, length = ids.shape[0], ids.shape[1] - 1
    cfg = load_config(folder / "config.yaml", [
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
        f"model.seq_length={length}", f"training.micro_batch_size={micro_batch_size}",
        f"training.global_batch_size={n}", "training.train_iters=1", "optimizer.warmup_iters=0",
        "optimizer.lr=0.01", "data.mock=true", f"checkpoint.init_from={folder}"])
    state = build_training_state(cfg, with_data=False)
    CheckpointManager(state, None).init_from(folder)

    def batches():
        for start in range(0, n, micro_batch_size):
            chunk = ids[start:start + micro_batch_size]
            yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "loss_mask": torch.ones(chunk.shape[0], length),
                   "position_ids": torch.arange(length).unsqueeze(0).expand(chunk.shape[0], length),
                   "source_ids": torch.zeros(chunk.shape[0], dtype=torch.long)}

    first = train_step(state, [batches()])
    second = train_step(state, [batches()])
    return {"loss": first.loss, "loss_after_update": second.loss, "skipped": first.skipped}
