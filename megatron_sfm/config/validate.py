"""Cross-field checks of a :class:`RunConfig` (each error names the key and the reason)."""

from __future__ import annotations

from megatron_sfm.config.schema import RunConfig
from megatron_sfm.errors import ConfigError


def validate_run_config(cfg: RunConfig, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` for a layout or shape that cannot run.

    ``world_size`` (number of ranks) enables the data-parallel checks.
    """
    m, p, t, o = cfg.model, cfg.parallel, cfg.training, cfg.optimizer
    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "model.vocab_size": m.vocab_size,
        "model.seq_length": m.seq_length, "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "parallel.tensor_model_parallel_size": p.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "training.micro_batch_size": t.micro_batch_size, "training.global_batch_size": t.global_batch_size,
        "training.train_iters": t.train_iters,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if m.ffn_hidden_size is not None and m.ffn_hidden_size <= 0:
        raise ConfigError(f"model.ffn_hidden_size: must be positive, got {m.ffn_hidden_size}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads: {m.num_attention_heads} heads do not divide "
            f"model.hidden_size {m.hidden_size}")
    if not 0.0 <= m.rotary_pct <= 1.0:
        raise ConfigError(f"model.rotary_pct: must be in [0, 1], got {m.rotary_pct}")
    rotary_dim = int(m.head_dim * m.rotary_pct)
    if rotary_dim % 2:
        raise ConfigError(
            f"model.rotary_pct: rotary dimension {rotary_dim} (head dim {m.head_dim} x {m.rotary_pct}) must be even")
    for key in ("hidden_dropout", "attention_dropout"):
        value = getattr(m, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{key}: must be in [0, 1), got {value}")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: TP={tp} does not divide model.num_attention_heads "
            f"{m.num_attention_heads}")
    if m.ffn_size % tp:
        raise ConfigError(f"parallel.tensor_model_parallel_size: TP={tp} does not divide the FFN size {m.ffn_size}")
    padded = m.padded_vocab(tp)
    if m.padded_vocab_size is not None and m.padded_vocab_size < m.vocab_size:
        raise ConfigError(
            f"model.padded_vocab_size: {m.padded_vocab_size} is smaller than model.vocab_size {m.vocab_size}")
    if padded % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: TP={tp} does not divide the padded vocabulary {padded}")
    if m.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size: PP={pp} does not divide model.num_layers {m.num_layers}")
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if vpp <= 0 or m.num_layers % (pp * vpp):
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size: PP x VPP = {pp}x{vpp} does not divide "
                f"model.num_layers {m.num_layers}")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel: needs tensor_model_parallel_size > 1")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr: {o.min_lr} is larger than optimizer.lr {o.lr}")
    if not 0.0 <= o.warmup_fraction <= 1.0:
        raise ConfigError(f"optimizer.warmup_fraction: must be in [0, 1], got {o.warmup_fraction}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"training.global_batch_size: {t.global_batch_size} is not divisible by "
            f"training.micro_batch_size {t.micro_batch_size}")
    if world_size is not None:
        if world_size % (tp * pp):
            raise ConfigError(
                f"parallel: TP x PP = {tp * pp} does not divide the world size {world_size}")
        dp = world_size // (tp * pp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"training.global_batch_size: {t.global_batch_size} is not divisible by "
                f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
