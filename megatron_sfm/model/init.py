"""Weight initialisation.

``pythia`` follows GPT-NeoX's Pythia configs: "small_init" (normal, std sqrt(2 / (5 d)))
for the input projections and embeddings, "wang_init" (std 2 / (L sqrt(d))) for the two
output projections of each layer (attention dense, fc2). ``normal`` is Megatron's
default (std ``init_method_std``, output layers scaled by 1 / sqrt(2 L)).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def _normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    init_.std = std  # type: ignore[attr-defined]
    return init_


def init_methods(kind: str, hidden_size: int, num_layers: int, std: float = 0.02):
    """(init_method, output_layer_init_method) for ``kind`` in {"pythia", "normal"}."""
    if kind == "pythia":
        return _normal(math.sqrt(2.0 / (5.0 * hidden_size))), _normal(2.0 / (num_layers * math.sqrt(hidden_size)))
    if kind == "normal":
        return _normal(std), _normal(std / math.sqrt(2.0 * num_layers))
    raise ValueError(f"unknown init {kind!r}")
