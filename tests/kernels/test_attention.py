"""rotary_flash_attention against a float64 PyTorch reference (rotary in PyTorch, then plain attention).

Runs the Triton kernels under the interpreter (see conftest.py). bf16 is not tested here:
the interpreter's tl.dot on bf16 operands is wrong (docs/kernels.md); the GPU
benchmark checks bf16.
"""

import math
import random

import pytest
import torch

from megatron_sfm.kernels import KernelUnavailableError
from megatron_sfm.kernels.attention import (
    apply_rotary_reference,
    attention_reference,
    rotary_flash_attention,
    rotary_tables,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _qkv(seq, batch, heads, head_dim, dtype, device, seed):
    """q, k, v as strided views of one fused [s, b, h, 3d] tensor (Megatron's layout), leaf = fused."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(seq, batch, heads, 3 * head_dim, generator=g, dtype=torch.float64).to(dtype).to(device)
    fused.requires_grad_(True)
    q, k, v = fused.split(head_dim, dim=-1)
    return fused, q, k, v


def _check(rel_err, *, seq, batch, heads, head_dim, rotary_dim, dtype, device, causal=True, offset=0, seed=0,
           block_sizes=None, softmax_scale=None):
    fused, q, k, v = _qkv(seq, batch, heads, head_dim, dtype, device, seed)
    assert not q.is_contiguous()
    out, lse = rotary_flash_attention(q, k, v, rotary_dim=rotary_dim, position_offset=offset, causal=causal,
                                      return_lse=True, block_sizes=block_sizes, softmax_scale=softmax_scale)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out.backward(g.to(dtype).to(device))

    ref_fused = fused.detach().cpu().double().requires_grad_(True)
    rq, rk, rv = ref_fused.split(head_dim, dim=-1)
    ref, ref_lse = attention_reference(rq, rk, rv, rotary_dim=rotary_dim, position_offset=offset, causal=causal,
                                       return_lse=True, softmax_scale=softmax_scale)
    ref.backward(g.to(dtype).double())

    tol = TOL[dtype]
    assert out.shape == (seq, batch, heads, head_dim) and out.dtype == dtype
    errors = {"out": rel_err(out, ref), "lse": rel_err(lse, ref_lse)}
    for name, idx in (("dq", 0), ("dk", 1), ("dv", 2)):
        sl = slice(idx * head_dim, (idx + 1) * head_dim)
        errors[name] = rel_err(fused.grad[..., sl], ref_fused.grad[..., sl])
    bad = {n: e for n, e in errors.items() if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim,rotary_dim,seq,batch,heads", [
    (64, 16, 37, 2, 2),    # Pythia-70m..410m heads
    (80, 20, 29, 1, 2),    # Pythia-2.8B: head and rotary dims not powers of two
    (128, 32, 45, 1, 2),   # Pythia-1.4B / 6.9B
    (256, 64, 19, 1, 1),   # Pythia-1B
])
def test_pythia_head_dims(poison_outputs, rel_err, device, dtype, head_dim, rotary_dim, seq, batch, heads):
    _check(rel_err, seq=seq, batch=batch, heads=heads, head_dim=head_dim, rotary_dim=rotary_dim, dtype=dtype,
           device=device, seed=head_dim)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_shapes(poison_outputs, rel_err, device, seed):
    rng = random.Random(seed)
    head_dim = rng.choice([64, 80, 128])
    rotary_dim = rng.choice([head_dim // 4, head_dim // 2, 2 * rng.randint(1, head_dim // 2)])
    seq = rng.choice([2, 7, 16, 33, 50])
    dtype = rng.choice([torch.float32, torch.float16])
    blocks = rng.choice([None, {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)},
                         {"fwd": (16, 32), "dkdv": (32, 16), "dq": (16, 32)}])
    _check(rel_err, seq=seq, batch=rng.randint(1, 2), heads=rng.randint(1, 3), head_dim=head_dim,
           rotary_dim=rotary_dim, dtype=dtype, device=device, seed=seed, block_sizes=blocks,
           offset=rng.choice([0, 5]))


@pytest.mark.parametrize("case", ["full_rotary", "no_rotary", "not_causal", "offset", "uneven_blocks",
                                  "block_multiple", "scale"])
def test_variants(poison_outputs, rel_err, device, case):
    kw = dict(seq=35, batch=1, heads=2, head_dim=64, rotary_dim=16, dtype=torch.float32, device=device, seed=7)
    if case == "full_rotary":
        kw["rotary_dim"] = 64
    elif case == "no_rotary":
        kw["rotary_dim"] = 0
    elif case == "not_causal":
        kw.update(causal=False, head_dim=80, rotary_dim=20)
    elif case == "offset":
        kw.update(offset=1000)
    elif case == "uneven_blocks":
        kw.update(block_sizes={"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)})
    elif case == "block_multiple":
        kw.update(seq=32)
    elif case == "scale":
        kw.update(softmax_scale=0.3, dtype=torch.float16)
    _check(rel_err, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_single_token(poison_outputs, device, dtype):
    """One position: out == v, dv == dout, and dq, dk vanish (a relative error is undefined there)."""
    fused, q, k, v = _qkv(1, 2, 3, 64, dtype, device, 11)
    out = rotary_flash_attention(q, k, v, rotary_dim=16)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert torch.equal(out, v.detach())
    assert torch.equal(fused.grad[..., 128:], dout)
    assert fused.grad[..., :128].abs().max().item() < 1e-5


def test_rotary_matches_transformers_gpt_neox(device):
    """Our rotary (reference and fused kernel) equals transformers' GPT-NeoX rotary."""
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox import modeling_gpt_neox as hf

    heads, head_dim, seq = 2, 80, 23
    config = GPTNeoXConfig(hidden_size=heads * head_dim, num_attention_heads=heads, rotary_pct=0.25,
                           rotary_emb_base=10000)
    rope = hf.GPTNeoXRotaryEmbedding(config)
    rotary_dim = int(head_dim * 0.25)
    assert rope.inv_freq.numel() == rotary_dim // 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, 1, heads, head_dim, generator=g)
    k = torch.randn(seq, 1, heads, head_dim, generator=g)
    cos, sin = rope(q, torch.arange(seq)[None])  # [1, s, rotary_dim]
    hf_q, hf_k = hf.apply_rotary_pos_emb(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), cos, sin)
    hf_q, hf_k = hf_q.permute(2, 0, 1, 3), hf_k.permute(2, 0, 1, 3)

    tcos, tsin = rotary_tables(rotary_dim, 10000.0, seq, "cpu")
    ours_q = apply_rotary_reference(q, tcos[:seq], tsin[:seq])
    torch.testing.assert_close(ours_q, hf_q, rtol=0, atol=2e-6)
    torch.testing.assert_close(apply_rotary_reference(k, tcos[:seq], tsin[:seq]), hf_k, rtol=0, atol=2e-6)

    # The fused kernel with HF-rotated q/k and no rotary == fused kernel rotating itself.
    q, k, hf_q, hf_k = (t.contiguous().to(device) for t in (q, k, hf_q, hf_k))
    fused = rotary_flash_attention(q, k, k, rotary_dim=rotary_dim)
    unfused = rotary_flash_attention(hf_q, hf_k, k, rotary_dim=0)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)


def test_megatron_style_tables(rel_err, device):
    """Explicit cos/sin tables (what the Megatron glue passes) are used by absolute position."""
    _, q, k, v = _qkv(20, 1, 2, 64, torch.float32, device, 3)
    angles = torch.arange(64, dtype=torch.float64)[:, None] * 0.37 ** torch.arange(8, dtype=torch.float64)
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    out = rotary_flash_attention(q, k, v, rotary_dim=16, rotary_cos=cos.to(device), rotary_sin=sin.to(device),
                                 position_offset=9)
    ref = attention_reference(q.detach().cpu().double(), k.detach().cpu().double(), v.detach().cpu().double(),
                              rotary_dim=16, rotary_cos=cos.double(), rotary_sin=sin.double(), position_offset=9)
    assert rel_err(out, ref) < 1e-5


def test_default_scale_is_inverse_sqrt_head_dim(rel_err, device):
    _, q, k, v = _qkv(9, 1, 1, 64, torch.float32, device, 5)
    a = rotary_flash_attention(q, k, v, rotary_dim=16)
    b = rotary_flash_attention(q, k, v, rotary_dim=16, softmax_scale=1 / math.sqrt(64))
    assert torch.equal(a, b)


def test_no_gpu_and_no_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(4, 1, 1, 64)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        rotary_flash_attention(q, q, q, rotary_dim=16)


def test_bad_arguments():
    q = torch.randn(4, 1, 2, 64)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary_flash_attention(q, q, q, rotary_dim=15)
    with pytest.raises(ValueError, match="grouped-query"):
        rotary_flash_attention(q, q[:, :, :1], q[:, :, :1], rotary_dim=16)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        rotary_flash_attention(q.double(), q.double(), q.double(), rotary_dim=16)
