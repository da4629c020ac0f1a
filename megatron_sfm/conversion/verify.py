"""``--verify``: the exported Hugging Face model computes the same logits as ours.

Our side: Megatron-Core's GPTModel at TP=1, PP=1 in this process, loaded from the
checkpoint by ``dist_checkpointing.load`` (Megatron's own reader, resharding whatever
layout wrote it; independent of the streaming reader the export used). Hugging Face side:
``AutoModelForCausalLM.from_pretrained`` on the exported folder.

Both run in fp32 on the CPU. For a bf16/fp16 export, our weights are rounded to that
dtype first (and the Hugging Face weights are upcast), so the comparison measures the
conversion, not the precision of the export. Tolerance: maximum absolute logit
difference ``DEFAULT_TOLERANCE`` (1e-4) unless given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
NUM_SEQUENCES = 4
MAX_TOKENS = 32


def verification_tokens(vocab: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """[NUM_SEQUENCES, min(MAX_TOKENS, seq_length)] token ids below ``vocab``, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (NUM_SEQUENCES, min(MAX_TOKENS, seq_length)), generator=gen)


def megatron_logits(iter_dir: Path, tokens: torch.Tensor, round_to: torch.dtype | None = None) -> torch.Tensor:
    """Logits [b, s, padded_vocab] of our GPTModel loaded from ``iter_dir`` at TP=1 PP=1 (fp32)."""
    from megatron.core import dist_checkpointing

    from megatron_sfm.checkpoint_format import read_run_config
    from megatron_sfm.config.loader import config_from_dict, config_to_dict
    from megatron_sfm.model.builder import build_gpt_model
    from megatron_sfm.model.parallel import destroy_parallel

    run = read_run_config(iter_dir)
    model_dict = config_to_dict(run.model)
    # Keep the saved embedding size at TP=1, use fp32 and the portable attention.
    model_dict.update(precision="fp32", attention_backend="sdpa", hidden_dropout=0.0, attention_dropout=0.0,
                      padded_vocab_size=run.model.padded_vocab(run.parallel.tensor_model_parallel_size))
    model_dict["fp8"] = {"format": "none"}
    cfg = config_from_dict({"model": model_dict})
    owned = _single_process_parallel(cfg.parallel)
    try:
        model = build_gpt_model(cfg.model, cfg.parallel, parallel_output=False)
        model.eval()
        try:
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir))
        except SfmError:
            raise
        except Exception as exc:  # noqa: BLE001 - Megatron raises CheckpointingException and others
            raise SfmError(f"{iter_dir}: Megatron-Core could not load the checkpoint for verification "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        model.load_state_dict(loaded["model"])
        device = next(model.parameters()).device
        with torch.no_grad():
            if round_to is not None:
                for p in model.parameters():
                    p.copy_(p.to(round_to).float())
            ids = tokens.to(device)
            pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
            logits = model(ids, pos, None)
        return logits.float().cpu()
    finally:
        if owned:
            destroy_parallel()


def _single_process_parallel(parallel) -> bool:
    """Set up a world-size-1 TP=1 PP=1 parallel state; True when this call created it.

    An existing single-process state (e.g. a test session's) is reused; a real
    distributed job is refused, since this builds the whole model in one process.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_sfm.model.parallel import initialize_parallel

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise SfmError("--verify builds a single-process model; run it outside a distributed job")
        if parallel_state.model_parallel_is_initialized() and (
                parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1):
            raise SfmError("--verify needs TP=1 PP=1 in this process; another parallel state is active")
        initialize_parallel(parallel, seed=0)
        return False
    initialize_parallel(parallel, seed=0)
    return True


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Logits of the exported folder (fp32, CPU), and a short greedy generation (it must run)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
        generated = model.generate(tokens[:1, :8], max_new_tokens=4, do_sample=False,
                                   pad_token_id=model.config.eos_token_id)
    return logits, generated[0].tolist()


def verify_export(iter_dir: Path, hf_dir: Path, dtype: str = "fp32", tolerance: float | None = None) -> dict:
    """Compare logits; raise :class:`SfmError` above ``tolerance``. Returns the measurements."""
    from megatron_sfm.checkpoint_format import read_run_config

    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    run = read_run_config(iter_dir)
    tokens = verification_tokens(run.model.vocab_size, run.model.seq_length)
    round_to = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    ours = megatron_logits(iter_dir, tokens, round_to)
    theirs, generated = hf_logits(hf_dir, tokens)
    if ours.shape != theirs.shape:
        raise SfmError(f"--verify: logits shapes differ: ours {list(ours.shape)}, Hugging Face {list(theirs.shape)}")
    diff = (ours - theirs).abs().max().item()
    result = {"max_abs_logit_diff": diff, "tolerance": tolerance, "sequences": tokens.shape[0],
              "tokens_per_sequence": tokens.shape[1], "max_abs_logit": ours.abs().max().item(),
              "greedy_generation": generated, "passed": diff <= tolerance}
    if not diff <= tolerance:
        raise SfmError(f"--verify: max |logit difference| {diff:.3g} exceeds the tolerance {tolerance:g} "
                       f"({tokens.shape[0]} sequences x {tokens.shape[1]} tokens)")
    log.info("verify: max |logit diff| %.3g <= %g", diff, tolerance)
    return result
