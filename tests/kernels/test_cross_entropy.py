"""fused_cross_entropy (Triton, interpreter) against the torch reference and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from megatron_sfm.kernels import KernelUnavailableError
from megatron_sfm.kernels.cross_entropy import cross_entropy_per_source_reference, fused_cross_entropy

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _inputs(n, vocab, sources, dtype, device, seed, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, vocab, generator=g, dtype=torch.float64)).to(dtype).to(device)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::ignore_every] = -100
    src = torch.randint(0, sources, (n,), generator=g)
    return logits, labels.to(device), src.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("n,vocab,block_v", [(41, 300, 64), (17, 1000, 128), (8, 50, 64)])
def test_matches_float64_reference(poison_outputs, rel_err, device, dtype, weighted, n, vocab, block_v):
    sources = 3
    logits, labels, src = _inputs(n, vocab, sources, dtype, device, seed=n)
    weights = torch.tensor([1.0, 0.25, 3.0], device=device) if weighted else None
    x = logits.clone().requires_grad_(True)
    loss, sums, counts = fused_cross_entropy(x, labels, src, sources, weights, block_v=block_v)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss.backward(upstream.float().to(device))

    xr = logits.detach().cpu().double().requires_grad_(True)
    ref_loss, ref_sums, ref_counts = cross_entropy_per_source_reference(
        xr, labels.cpu(), src.cpu(), sources, None if weights is None else weights.cpu().double())
    ref_loss.backward(upstream.float().double())

    assert loss.dtype == torch.float32 and sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), ref_counts)
    assert torch.equal(loss.cpu()[labels.cpu() == -100], torch.zeros(int((labels == -100).sum())))
    tol = TOL[dtype]
    # Losses are computed in fp32 from the given logits: fp32 accuracy for every input dtype.
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(sums, ref_sums) < 1e-5
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, xr.grad) < tol


def test_weighted_loss_is_weight_times_unweighted(device):
    logits, labels, src = _inputs(30, 200, 4, torch.float32, device, seed=3)
    weights = torch.tensor([0.0, 1.0, 2.5, 0.5], device=device)
    plain, sums_plain, counts_plain = fused_cross_entropy(logits, labels, src, 4, None, block_v=64)
    weighted, sums_w, counts_w = fused_cross_entropy(logits, labels, src, 4, weights, block_v=64)
    torch.testing.assert_close(weighted, plain * weights[src], rtol=1e-6, atol=0)
    # Source sums stay unweighted: each source's true mean loss, whatever its weight.
    torch.testing.assert_close(sums_w, sums_plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts_w, counts_plain)


def test_unweighted_training_loss_matches_f_cross_entropy(rel_err, device):
    """per_token_loss.sum() / counted tokens == F.cross_entropy(mean), same gradient."""
    logits, labels, _ = _inputs(25, 300, 1, torch.float32, device, seed=4)
    x1 = logits.clone().requires_grad_(True)
    loss, sums, counts = fused_cross_entropy(x1, labels, None, 1, block_v=64)
    mean = loss.sum() / counts.sum()
    mean.backward()
    x2 = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(x2, labels, ignore_index=-100)
    ref.backward()
    assert abs(mean.item() - ref.item()) < 1e-5 * ref.item()
    assert abs(sums.item() / counts.item() - ref.item()) < 1e-5 * ref.item()
    assert rel_err(x1.grad, x2.grad) < 1e-5


def test_without_source_ids_all_tokens_are_source_zero(device):
    logits, labels, _ = _inputs(20, 100, 1, torch.float32, device, seed=5)
    loss, sums, counts = fused_cross_entropy(logits, labels, None, 2, block_v=64)
    ref_loss, ref_sums, ref_counts = cross_entropy_per_source_reference(logits, labels, None, 2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist() == [16, 0]


def test_all_ignored_gives_zero_loss_and_zero_grad(poison_outputs, device):
    logits = torch.randn(6, 70, device=device, requires_grad=True)
    labels = torch.full((6,), -100, device=device)
    loss, sums, counts = fused_cross_entropy(logits, labels, torch.zeros(6, dtype=torch.long, device=device), 2,
                                             block_v=64)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(6, device=device))
    assert torch.equal(sums, torch.zeros(2, device=device)) and counts.tolist() == [0, 0]
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_source_id_gives_nan_not_a_wrong_number(device):
    logits, labels, src = _inputs(10, 80, 2, torch.float32, device, seed=6, ignore_every=100)
    src[3] = 7
    loss, _, counts = fused_cross_entropy(logits, labels, src, 2, block_v=64)
    assert torch.isnan(loss[3]) and not torch.isnan(loss[torch.arange(10, device=device) != 3]).any()
    assert int(counts.sum()) == 8  # row 0 is ignored, row 3 has no valid source
    with pytest.raises(IndexError, match="source ids"):
        cross_entropy_per_source_reference(logits, labels, src, 2)


def test_strided_rows(rel_err, device):
    """Rows of a [s, b, V] tensor for one batch entry: row stride b*V, unit column stride."""
    base = torch.randn(5, 3, 90, device=device)
    rows = base.select(1, 1)
    assert not rows.is_contiguous()
    labels = torch.randint(0, 90, (5,), device=device)
    x = rows.detach().requires_grad_(True)
    loss, _, _ = fused_cross_entropy(x, labels, None, 1, block_v=32)
    loss.sum().backward()
    xr = rows.detach().double().requires_grad_(True)
    ref, _, _ = cross_entropy_per_source_reference(xr, labels, None, 1)
    ref.sum().backward()
    assert rel_err(loss, ref) < 1e-5 and rel_err(x.grad, xr.grad) < 1e-5


def test_no_gpu_and_no_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        fused_cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), None, 1)


def test_bad_shapes():
    with pytest.raises(ValueError, match="source_weights"):
        fused_cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), None, 2, torch.ones(3))
    with pytest.raises(ValueError, match="labels"):
        fused_cross_entropy(torch.randn(2, 8), torch.zeros(3, dtype=torch.long), None, 1)
