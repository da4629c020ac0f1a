"""Random-token batches: the trainer's batch format, next-token labels, seeded per DP rank."""

from __future__ import annotations

import torch

from megatron_sfm.benchmark.mock_data import RandomTokenBatches


def test_batch_format_and_next_token_labels():
    it = RandomTokenBatches(3, 16, 50, torch.device("cpu"), seed=7, pool=2)
    batch = next(it)
    assert set(batch) == {"tokens", "labels", "position_ids", "loss_mask", "source_ids"}
    assert batch["tokens"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 16)
    assert batch["loss_mask"].shape == (3, 16) and bool((batch["loss_mask"] == 1).all())
    assert batch["source_ids"].tolist() == [0, 0, 0]
    assert batch["tokens"].dtype == torch.long
    assert int(batch["tokens"].min()) >= 0 and int(batch["tokens"].max()) < 50
    # labels are the tokens shifted by one: one sequence of 17 ids underneath
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"][1], torch.arange(16))


def test_pool_cycles_and_seeds_differ_by_data_parallel_rank():
    a = RandomTokenBatches(2, 32, 1000, torch.device("cpu"), seed=1, dp_rank=0, pool=2)
    first, second, third = next(a), next(a), next(a)
    assert not torch.equal(first["tokens"], second["tokens"])
    assert third is first
    same = RandomTokenBatches(2, 32, 1000, torch.device("cpu"), seed=1, dp_rank=0, pool=2)
    assert torch.equal(next(same)["tokens"], first["tokens"])  # TP/PP peers see the same batch
    other = RandomTokenBatches(2, 32, 1000, torch.device("cpu"), seed=1, dp_rank=1, pool=2)
    assert not torch.equal(next(other)["tokens"], first["tokens"])
