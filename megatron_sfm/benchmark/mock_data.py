"""Random-token micro-batches generated on the training device (no disk reads).

Each data-parallel rank draws its own tokens from a generator seeded with
``seed + dp_rank``, so the ranks of one tensor- or pipeline-parallel group see the
same batch (as Megatron requires) and data-parallel ranks see different ones. A small
pool of batches is drawn up front and cycled, so no random numbers are drawn inside a
timed step.
"""

from __future__ import annotations

import torch


class RandomTokenBatches:
    """An endless iterator of micro-batches in the trainer's batch format.

    Yields dicts with ``tokens``, ``labels`` (the next token), ``position_ids``,
    ``loss_mask`` (all ones) and ``source_ids`` (all zeros: one source), each of shape
    [micro_batch_size, seq_length] (``source_ids``: [micro_batch_size]) on ``device``.
    """

    def __init__(self, micro_batch_size: int, seq_length: int, vocab_size: int, device: torch.device,
                 *, seed: int = 1234, dp_rank: int = 0, pool: int = 2):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        generator = torch.Generator(device=device)
        generator.manual_seed(seed + dp_rank)
        self.batches = []
        positions = torch.arange(seq_length, device=device).unsqueeze(0).expand(micro_batch_size, -1).contiguous()
        for _ in range(max(1, pool)):
            ids = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=generator,
                                device=device, dtype=torch.long)
            self.batches.append({
                "tokens": ids[:, :-1].contiguous(),
                "labels": ids[:, 1:].contiguous(),
                "position_ids": positions,
                "loss_mask": torch.ones(micro_batch_size, seq_length, dtype=torch.float, device=device),
                "source_ids": torch.zeros(micro_batch_size, dtype=torch.long, device=device),
            })
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self._next]
        self._next = (self._next + 1) % len(self.batches)
        return batch
