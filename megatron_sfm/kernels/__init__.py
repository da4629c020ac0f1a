"""Triton kernels for megatron-sfm (a leaf package: imports only triton, torch and stdlib).

* :func:`megatron_sfm.kernels.attention.rotary_flash_attention`: causal flash attention
  with GPT-NeoX partial rotary applied inside the kernel, forward and backward.
* :func:`megatron_sfm.kernels.cross_entropy.fused_cross_entropy`: cross-entropy with
  per-source loss sums, token counts and optional per-source weights; plus
  :func:`~megatron_sfm.kernels.cross_entropy.cross_entropy_per_source_reference` in torch ops.

The kernels run on a CUDA GPU, or on the CPU with ``TRITON_INTERPRET=1`` set before the
first kernel call; elsewhere they raise :class:`KernelUnavailableError`. Triton itself is
imported only on that first call. See docs/kernels.md.
"""

from megatron_sfm.kernels._runtime import KernelUnavailableError, interpreter_enabled, kernels_available

__all__ = ["KernelUnavailableError", "interpreter_enabled", "kernels_available"]
