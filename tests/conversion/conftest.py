"""Fixtures for the conversion tests: a tiny Hugging Face GPTNeoX saved by transformers,
checkpoints written by ``sfm train`` at three layouts, and an imported checkpoint.

Everything is session-scoped: the checkpoints take tens of seconds each on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sfm.testing.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "configs" / "tiny.yaml"
LAYOUTS = {"tp1pp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def make_hf_model(folder: Path, *, dtype=None, num_layers: int = 4, vocab: int = 512, seed: int = 0,
                  tokenizer_vocab: int | None = None) -> Path:
    """A random GPTNeoXForCausalLM (non-trivial norms and biases) saved with save_pretrained."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=64,
                        use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPTNeoXForCausalLM(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(5.0)  # logits of order 1, so a wrong mapping cannot hide under the tolerance
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder))
    if tokenizer_vocab is not None:
        make_tokenizer(tokenizer_vocab).save_pretrained(str(folder))
    return folder


def make_tokenizer(vocab: int):
    """A byte-level BPE in the GPT-NeoX layout (<|endoftext|> = id 0) with ``vocab`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the model said that the aligned assistant answered the question honestly"] * 50 + \
           [f"document {i} about training language models on text number {i * 7}" for i in range(200)]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def start_sfm_train(save: Path, tp: int, pp: int) -> subprocess.Popen:
    """Start ``sfm train examples/configs/tiny.yaml`` for one step on tp*pp CPU ranks, saving to ``save``."""
    overrides = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                 "model.num_layers=4", "training.train_iters=1", "training.log_interval=1",
                 "training.micro_batch_size=2", "training.global_batch_size=4", "optimizer.warmup_iters=0",
                 f"checkpoint.save={save}", "checkpoint.save_interval=0", "logging.log_memory=false"]
    world = tp * pp
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if world == 1:
        cmd = [sys.executable, "-m", "megatron_sfm.cli", "train", str(TINY), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "megatron_sfm.cli", "train", str(TINY), *overrides]
    save.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=save.parent)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints written by ``sfm train`` at TP=1 PP=1, TP=2 and PP=2 (one step each)."""
    root = tmp_path_factory.mktemp("trained")
    # The three runs are independent: run them side by side (mostly start-up time).
    procs = {name: start_sfm_train(root / name, tp, pp) for name, (tp, pp) in LAYOUTS.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sfm train ({name}) failed\n{out[-3000:]}\n{err[-5000:]}"
        assert (root / name / "latest").read_text().strip() == "1"
    return {name: root / name for name in LAYOUTS}


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory) -> Path:
    """fp32 GPTNeoX, 4 layers, 512 embedding rows, a 300-token tokenizer (padding 212 rows)."""
    return make_hf_model(tmp_path_factory.mktemp("hf") / "tiny", tokenizer_vocab=300)


@pytest.fixture(scope="session")
def imported_tp2pp2(tmp_path_factory, hf_tiny) -> Path:
    """``hf_tiny`` imported with from-hf at TP=2, PP=2 (four writer processes)."""
    from megatron_sfm.conversion import import_from_hf

    return import_from_hf(hf_tiny, tmp_path_factory.mktemp("imported") / "ckpt", tp=2, pp=2)
