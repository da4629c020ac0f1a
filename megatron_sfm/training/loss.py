"""The training loss: per-token cross-entropy, per-source sums, per-source loss weights.

Two implementations behind ``training.cross_entropy`` (see docs/training.md):

* ``megatron``: GPTModel computes the per-token loss with Megatron's
  ``vocab_parallel_cross_entropy`` (any TP); :func:`megatron_loss` masks it, applies the
  source weights and sums per source with ``index_add``.
* ``fused``: TP=1 only. GPTModel returns its logits in Megatron's ``[s, b, V]`` order (no
  transposed copy, see :func:`megatron_sfm.compat.install_logits_output`) and :func:`fused_loss` runs
  ``megatron_sfm.kernels.cross_entropy.fused_cross_entropy`` over them: loss, weights,
  per-source sums and token counts in one pass forward and one backward.

Both return what Megatron's pipeline schedules expect from a loss function,
``(loss, num_tokens, {"report": report})``, where ``loss`` is the *weighted* sum
``sum_i w[src_i] * CE_i`` over counted tokens (the schedule divides it by ``num_tokens``
and the number of micro-batches) and ``report`` (float64, a copy: the schedule divides the
loss in place) is::

    [unweighted loss sum, counted tokens, per-source unweighted sums (S), per-source tokens (S),
     weighted loss sum]
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_sfm.errors import SfmError

IGNORE_INDEX = -100
MODES = ("auto", "fused", "megatron")


def report_size(num_sources: int) -> int:
    return 3 + 2 * num_sources


def resolve_cross_entropy(mode: str, tensor_parallel_size: int, device: torch.device) -> str:
    """``training.cross_entropy`` -> ``"fused"`` or ``"megatron"`` for this run.

    ``auto`` is ``fused`` at TP=1 on a CUDA device where the Triton kernels can run, else
    ``megatron`` (on the CPU the interpreter is far too slow to pick it unasked). ``fused``
    is an error at TP>1 (vocabulary-parallel logits) and where the kernels cannot run.
    """
    if mode not in MODES:
        raise SfmError(f"training.cross_entropy: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "megatron":
        return "megatron"
    from megatron_sfm.kernels import kernels_available

    device = torch.device(device)
    if mode == "auto":
        usable = tensor_parallel_size == 1 and device.type == "cuda" and kernels_available(device)
        return "fused" if usable else "megatron"
    if tensor_parallel_size > 1:
        raise SfmError(f"training.cross_entropy: 'fused' needs parallel.tensor_model_parallel_size 1, got "
                       f"{tensor_parallel_size} (the logits are split over the vocabulary; use auto or megatron)")
    if not kernels_available(device):
        raise SfmError(f"training.cross_entropy: 'fused' needs the Triton kernels, which cannot run on {device} "
                       f"(use a CUDA GPU, set TRITON_INTERPRET=1 for CPU tests, or use auto/megatron)")
    return "fused"


def _weights_per_sample(source_weights: Optional[torch.Tensor], source_ids: torch.Tensor) -> Optional[torch.Tensor]:
    if source_weights is None:
        return None
    return source_weights.to(device=source_ids.device, dtype=torch.float32)[source_ids]


def megatron_loss(loss_mask: torch.Tensor, source_ids: torch.Tensor, num_sources: int,
                  source_weights: Optional[torch.Tensor], output_tensor: torch.Tensor):
    """Megatron's per-token losses ``[b, s]`` -> (weighted loss sum, token count, report)."""
    losses = output_tensor.float()
    mask = loss_mask.float()
    per_sample = (losses * mask).sum(dim=1)
    per_sample_tokens = mask.sum(dim=1)
    w = _weights_per_sample(source_weights, source_ids)
    loss = per_sample.sum() if w is None else (per_sample * w).sum()
    num_tokens = per_sample_tokens.sum().to(torch.int)
    report = torch.zeros(report_size(num_sources), dtype=torch.float64, device=losses.device)
    report[0] = per_sample.detach().sum().double()
    report[1] = per_sample_tokens.sum().double()
    report[2:2 + num_sources].index_add_(0, source_ids, per_sample.detach().double())
    report[2 + num_sources:2 + 2 * num_sources].index_add_(0, source_ids, per_sample_tokens.double())
    report[-1] = loss.detach().double()
    return loss, num_tokens, {"report": report}


def _interpreter_block(vocab: int, device: torch.device) -> Optional[int]:
    """Under Triton's interpreter, one vocabulary chunk per row (its cost is per chunk)."""
    from megatron_sfm.kernels import interpreter_enabled

    if device.type == "cuda" or not interpreter_enabled():
        return None  # compiled kernels: autotuned
    return min(1 << max(vocab - 1, 1).bit_length(), 4096)


def fused_loss(labels: torch.Tensor, loss_mask: torch.Tensor, source_ids: torch.Tensor, num_sources: int,
               source_weights: Optional[torch.Tensor], logits: torch.Tensor):
    """Logits ``[s, b, V]`` -> (weighted loss sum, token count, report) with the fused kernel.

    ``labels``, ``loss_mask`` are ``[b, s]`` and ``source_ids`` ``[b]`` as the data loader
    gives them; they are rearranged to the logits' ``[s, b]`` order (small tensors), the
    logits are only viewed as ``[s * b, V]``. Masked tokens become ``ignore_index``.
    """
    from megatron_sfm.kernels.cross_entropy import fused_cross_entropy

    s, b, vocab = logits.shape
    flat_logits = logits.view(s * b, vocab) if logits.is_contiguous() else logits.reshape(s * b, vocab)
    flat_labels = labels.masked_fill(loss_mask == 0, IGNORE_INDEX).t().reshape(-1)
    flat_sources = source_ids.view(1, b).expand(s, b).reshape(-1)
    per_token, sums, counts = fused_cross_entropy(
        flat_logits, flat_labels, flat_sources, num_sources, source_weights, IGNORE_INDEX,
        block_v=_interpreter_block(vocab, logits.device))
    loss = per_token.sum()
    total_tokens = counts.sum()
    report = torch.empty(report_size(num_sources), dtype=torch.float64, device=logits.device)
    report[0] = sums.sum().double()
    report[1] = total_tokens.double()
    report[2:2 + num_sources] = sums.double()
    report[2 + num_sources:2 + 2 * num_sources] = counts.double()
    report[-1] = loss.detach().double()
    return loss, total_tokens.to(torch.int), {"report": report}


def check_loss_weights(raw, where: str) -> dict[str, float]:
    """A ``{source: weight}`` mapping, checked: finite non-negative numbers; errors name ``where``."""
    import math

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SfmError(f"{where}: expected a mapping {{source: weight}}, got {type(raw).__name__} {raw!r}")
    out = {}
    for name, w in raw.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise SfmError(f"{where}.{name}: a loss weight must be a finite number >= 0, got {w!r}")
        out[str(name)] = float(w)
    return out


def weight_vector(source_names: list[str], weights: dict, where: str) -> Optional[list[float]]:
    """Per-source weights in ``source_names`` order (missing: 1.0); None when all are 1.

    A name that is not a source of the run is an error naming ``where``.
    """
    weights = check_loss_weights(weights, where)
    unknown = sorted(set(weights) - set(source_names))
    if unknown:
        raise SfmError(f"{where}: {', '.join(map(repr, unknown))} is not a source of this run "
                       f"(sources: {', '.join(source_names)})")
    vec = [weights.get(name, 1.0) for name in source_names]
    return None if all(w == 1.0 for w in vec) else vec
