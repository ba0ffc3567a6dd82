"""What every reader of tensors shares: :class:`TensorRef`, the layout rule, matrix dimensions.

A leaf module: it imports nothing else from kappatune, and :mod:`~kappatune.scan`,
:mod:`~kappatune.checkpoint`, :mod:`~kappatune.quant`, :mod:`~kappatune.kappa` and
:mod:`~kappatune.optimizer` import it.

Layouts
-------
A weight tensor is analysed as one or more matrices, by its *layout*:

* ``"matrix"``: a 2-D weight ``(m, n)``, used as is;
* ``"flatten"``: an N-D weight such as a convolution kernel ``(out, in, k…)``, reshaped to
  ``(out, -1)``;
* ``"stack"``: a 3-D parameter that stores a stack of matrices ``(num_matrices, m, n)``, such as
  the fused expert weights of a mixture-of-experts layer; κ is computed per matrix.

:func:`default_layout` is the one rule that picks it, for a model and for a checkpoint alike (so a
checkpoint scanned by the command line and the model loaded from it share cache entries): ≥ 4-D
tensors and convolution kernels are flattened; a 3-D tensor is a convolution kernel when its owner
is a convolution module, or, without a module (a checkpoint), when its name ends in ``weight``
(``nn.Conv1d`` and ``nn.ConvTranspose1d`` store ``weight``; fused expert stacks are bare
parameters such as ``experts.gate_up_proj``) or contains ``conv``; every other 3-D tensor is a stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Tuple

import torch

__all__ = ["TensorRef", "Layout", "default_layout", "resolve_layout", "matrix_dims", "num_matrices",
           "dtype_name", "clean_name"]

Layout = Literal["auto", "matrix", "flatten", "stack"]

# Components that wrappers insert into parameter names (FSDP1, activation checkpointing, compile).
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


@dataclass
class TensorRef:
    """A tensor to analyse, loaded on demand.

    Args:
        name (str): the parameter or checkpoint key.
        shape (Tuple[int, ...]): the logical shape (of the dequantized weight for a quantized one).
        dtype (str): the stored dtype, spelt as ``str(torch.dtype)`` without ``"torch."``.
        load (Callable[[], torch.Tensor]): returns the tensor whose κ is wanted (for a quantized
            weight: its dequantized matrix).
        layout (str): ``"auto"``, ``"matrix"``, ``"flatten"`` or ``"stack"`` (default ``"auto"``:
            see :func:`resolve_layout`).
        digest (Optional[Callable[[], str]]): identifies the stored content for the cache
            (default ``None``: the digest of ``load()``).
        floating (bool): whether the values are floating point (default ``True``); others are skipped.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor]
    layout: str = "auto"
    digest: Optional[Callable[[], str]] = None
    floating: bool = True

    @property
    def resolved_layout(self) -> str:
        """:func:`resolve_layout` of this reference's shape and layout."""
        return resolve_layout(self.shape, self.layout, name=self.name)  # type: ignore[arg-type]


def default_layout(name: str, shape: Sequence[int], *, conv: Optional[bool] = None) -> str:
    """The layout of a weight by the rule of the module docstring.

    Args:
        name (str): the parameter or checkpoint name.
        shape (Sequence[int]): its shape.
        conv (Optional[bool]): whether its owner module is a convolution (default ``None``:
            unknown, as in a checkpoint).

    Returns:
        ``"flatten"``, or ``"auto"`` (which :func:`resolve_layout` turns into ``"matrix"`` for
        2-D and ``"stack"`` for 3-D).
    """
    if conv:
        return "flatten"
    if len(shape) == 3:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" or "conv" in name.lower():
            return "flatten"
    return "auto"


def resolve_layout(shape: Sequence[int], layout: Layout = "auto", *, name: str = "tensor") -> str:
    """The layout used for a tensor of ``shape``.

    Args:
        shape (Sequence[int]): the tensor's shape (at least 2-D).
        layout (str): ``"auto"`` (default: 2-D → ``"matrix"``, 3-D → ``"stack"``, ≥ 4-D →
            ``"flatten"``), or one of those three, checked against ``shape``.
        name (str): names the tensor in errors (default ``"tensor"``).

    Raises:
        ValueError: fewer than 2 dimensions, an unknown layout, or one that does not fit ``shape``.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{name}: κ needs a tensor with at least 2 dimensions, got shape {shape}")
    if layout == "auto":
        return "matrix" if ndim == 2 else ("stack" if ndim == 3 else "flatten")
    if layout not in ("matrix", "flatten", "stack"):
        raise ValueError(f"layout must be 'auto', 'matrix', 'flatten' or 'stack', got {layout!r}")
    if layout == "matrix" and ndim != 2:
        raise ValueError(f"{name}: layout='matrix' needs a 2-D tensor, got shape {shape}; use 'flatten' or 'stack'")
    if layout == "stack" and ndim != 3:
        raise ValueError(f"{name}: layout='stack' needs a 3-D tensor (num_matrices, m, n), got shape {shape}")
    return layout


def matrix_dims(shape: Sequence[int], layout: str = "auto") -> Tuple[int, int]:
    """``(m, n)`` of each matrix a tensor of ``shape`` is analysed as, under ``layout``."""
    shape = tuple(shape)
    lay = resolve_layout(shape, layout)  # type: ignore[arg-type]
    if lay == "stack":
        return shape[1], shape[2]
    return shape[0], math.prod(shape[1:])


def num_matrices(shape: Sequence[int], layout: str = "auto") -> int:
    """How many matrices a tensor of ``shape`` holds under ``layout`` (``shape[0]`` for a stack, else 1)."""
    return tuple(shape)[0] if resolve_layout(shape, layout) == "stack" else 1  # type: ignore[arg-type]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the spelling of :attr:`TensorRef.dtype`)."""
    return str(dtype).replace("torch.", "")


def clean_name(name: str) -> str:
    """A parameter name without the components wrappers insert.

    ``_fsdp_wrapped_module.model.layers.0.…`` → ``model.layers.0.…`` (FSDP1, activation
    checkpointing and ``torch.compile`` wrappers).
    """
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)
