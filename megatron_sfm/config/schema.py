"""The dataclasses that make up one run's configuration.

Units are in the field names or comments: iterations, samples (sequences), tokens.
Only plain types are used (int, float, str, bool, Optional, list, dict, Literal) so a
YAML file maps onto them one to one and the loader can type-check every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

AttentionBackend = Literal["auto", "sdpa", "local", "te", "triton"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class FP8Config:
    """FP8 training. ``format: none`` disables it; anything else needs a working backend.

    ``backend: te`` uses Transformer Engine recipes (delayed, tensorwise, blockwise,
    mxfp8); ``torchao`` uses torchao float8 training on our own linear layers (recipes
    tensorwise, rowwise; ``megatron_sfm.model.float8``); ``auto`` picks TE when importable,
    else torchao. A config that asks for FP8 without a working backend is an error, never
    a quiet bf16 run. ``emulate`` (torchao only) runs the float8 casts with high-precision
    GEMMs on any device, for numerics checks; ``compile`` (torchao only; None: on CUDA)
    compiles each float8 matmul so its casts fuse.
    """

    format: Literal["none", "e4m3", "hybrid"] = "none"
    backend: Literal["auto", "te", "torchao"] = "auto"
    recipe: Literal["delayed", "tensorwise", "rowwise", "blockwise", "mxfp8"] = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0
    emulate: bool = False
    compile: Optional[bool] = None


@dataclass
class ModelConfig:
    """GPT-NeoX / Pythia architecture (see docs/architecture.md)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    vocab_size: int = 512  # the tokenizer's size; the embedding is padded (see below)
    padded_vocab_size: Optional[int] = None  # explicit padded size (Pythia-6.9B: 50432)
    make_vocab_size_divisible_by: int = 128  # times TP, Megatron-style
    seq_length: int = 2048  # tokens per sample
    max_position_embeddings: Optional[int] = None  # None: seq_length (HF config field)
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    layernorm_epsilon: float = 1e-5
    init: Literal["pythia", "normal"] = "pythia"
    init_method_std: float = 0.02  # used by init=normal
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_backend: AttentionBackend = "auto"
    precision: Precision = "bf16"
    fp8: FP8Config = field(default_factory=FP8Config)

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab(self, tensor_parallel_size: int = 1) -> int:
        """Embedding rows: explicit ``padded_vocab_size`` or Megatron-style padding."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """Model parallel layout; data parallel size is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True


@dataclass
class OptimizerConfig:
    """Adam(W) with cosine decay; defaults are the paper's pretraining recipe."""

    lr: float = 3e-4
    min_lr: float = 1.2e-5
    warmup_fraction: float = 0.01  # of train_iters; ignored when warmup_iters is set
    warmup_iters: Optional[int] = None
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4  # samples per micro-batch per data-parallel rank
    global_batch_size: int = 8  # samples per optimizer step, all ranks
    train_iters: int = 100
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0  # 0: no validation
    eval_iters: int = 2
    max_consecutive_nonfinite: int = 5  # stop (after saving) past this many skipped steps
    recompute_activations: bool = False
    exit_interval: Optional[int] = None  # stop (after saving) at an iteration multiple of this
    # loss kernel: fused = Triton cross-entropy with per-source sums (TP=1; CUDA, or CPU with
    # TRITON_INTERPRET=1); megatron = Megatron's (vocab-parallel) cross-entropy; auto = fused at
    # TP=1 on a CUDA GPU where the kernels run, else megatron
    cross_entropy: Literal["auto", "fused", "megatron"] = "auto"


@dataclass
class DataConfig:
    """Where samples come from. ``blend`` is a file written by ``sfm data mix``.

    ``mock: true`` uses Megatron-Core's MockGPTDataset (benchmarks, smoke tests).
    """

    blend: Optional[str] = None  # a stage's blend JSON (``{"train": [w, prefix, ...], ...}``)
    phases: Optional[str] = None  # a phases JSON for late insertion (written by sfm data mix)
    stage: Optional[str] = None  # which stage of the phases JSON (pretrain / midtrain); needed with several
    mock: bool = False
    tokenizer: Optional[str] = None  # tokenizer.json / HF folder / sentencepiece .model
    # dataset seed (Megatron's random_seed) for data that carries none (hand-written blends, mock);
    # sfm data mix output carries its spec's seed, and a different value here is refused
    split_seed: Optional[int] = None  # None: the data's seed, else 1234
    cache_dir: Optional[str] = None  # Megatron's dataset index cache; None: beside the blend
    eod_token_id: int = 0  # end-of-document id (GPT-NeoX tokenizer: 0, "<|endoftext|>")
    pad_token_id: Optional[int] = None  # None: no padding token in the data (loss never masked by id)
    # per-source loss weights {source name: w >= 0} (missing sources: 1); they override the
    # "loss_weights" of data.phases; training loss = sum(w_src * token_loss) / tokens
    source_loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # checkpoint folder; None: no checkpoints
    save_interval: int = 0  # iterations; 0: only at exit
    load: Optional[str] = None  # resume from here (default: ``save`` when it has a checkpoint)
    init_from: Optional[str] = None  # start fresh from these weights (midtraining)
    async_save: bool = True  # on GPU; on CPU only with SFM_ASYNC_SAVE_ON_CPU=1
    keep_last: int = 0  # 0: keep all
    load_optimizer: bool = True  # False: resume model weights and progress, fresh optimizer state
    fully_parallel_save: bool = True  # spread the writing of replicated shards over data-parallel ranks
    verify_checksums: bool = True  # check the manifest's content checksums on resume / init_from
    # resume even though a schedule setting (train_iters, batch size, seq length, LR schedule,
    # data blend) differs from the checkpoint's config; the change is logged and recorded
    allow_schedule_change: bool = False


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None  # None: <checkpoint.save>/tensorboard when saving
    log_memory: bool = True
    peak_tflops: Optional[float] = None  # per-GPU peak for MFU; None: looked up (H100 SXM dense)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
