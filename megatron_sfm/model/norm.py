"""LayerNorm with bias that also works under sequence parallelism.

Megatron-Core's torch fallback norm refuses sequence parallelism (0.16.1
``transformer/torch_norm.py``); apex is optional. This plain ``torch.nn.LayerNorm``
tags its parameters with ``sequence_parallel`` so that ``finalize_model_grads``
all-reduces their gradients over the tensor-parallel group, which makes TP+SP training
match TP=1 (without the tag the gradients are silently wrong).
"""

from __future__ import annotations

import torch


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, elementwise_affine=True, bias=True,
                         dtype=config.params_dtype)
        for param in self.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
