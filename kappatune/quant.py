"""Quantized weights (bitsandbytes 4-bit / 8-bit): κ of the dequantized matrix.

A model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (NF4 or FP4, with or without
double quantization) or ``load_in_8bit=True`` stores its linear weights as ``Params4bit``
(packed 4-bit codes plus a quantization state) or ``Int8Params`` (int8 codes plus one scale per
row). :func:`kappatune.scan` analyses such a weight by dequantizing it, one tensor at a time,
exactly as the layer does in its forward pass, and computing κ of that matrix:

.. math::  W = \\mathrm{dequant}(Q, s), \\qquad \\kappa = \\sigma_{\\max}(W) / \\sigma_{\\min}(W).

For NF4/FP4, :math:`W_{ij} = \\mathrm{code}[Q_{ij}] \\cdot \\mathrm{absmax}_{b(i,j)}` (one absmax per
block of ``blocksize`` values); for int8, :math:`W_{ij} = Q_{ij} \\cdot \\mathrm{SCB}_i / 127`.

The κ cache entry of a quantized weight is keyed by a digest of what is stored, never of the
dequantized floats: the quantized bytes and the whole quantization state (absmax, quantization
map, block size, quant type, logical shape and dtype, the nested state of double quantization;
for int8 the ``SCB`` row scales). A model quantized again, differently, gets new digests.

On CPUs with AVX512-BF16, bitsandbytes rewrites a 4-bit weight in place at its first
inference-mode forward (a tiled layout with a bfloat16 absmax that ``dequantize_4bit`` cannot
read); such a weight is dequantized from that layout, and since its absmax was rounded its digest
(and κ, slightly) differs from the weight before.

bitsandbytes is imported only when a parameter's class comes from it, so this module costs
nothing to models that do not use it.

Example::

    >>> from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    >>> table = kappatune.scan(model)       # κ of every dequantized 4-bit weight
    >>> table[0].dtype
    'nf4'
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

import torch
from torch import nn

from .cache import tensor_digest
from .refs import TensorRef

__all__ = ["is_quantized_param"]

logger = logging.getLogger(__name__)


def _from_bnb(p: object) -> bool:
    return type(p).__module__.startswith("bitsandbytes")


def _kind(p: torch.Tensor) -> Optional[str]:
    """``"4bit"`` / ``"int8"`` for a bitsandbytes parameter holding quantized data, else ``None``."""
    if not _from_bnb(p):
        return None
    import bitsandbytes as bnb  # the parameter already comes from it

    if isinstance(p, bnb.nn.Params4bit):
        if getattr(p, "quant_state", None) is not None and getattr(p, "bnb_quantized", True):
            return "4bit"
        return None  # not quantized yet (still the float weight, quantized on the move to a device)
    if isinstance(p, bnb.nn.Int8Params):
        return "int8" if p.dtype == torch.int8 else None  # has_fp16_weights keeps a float weight
    return None


def is_quantized_param(p: torch.Tensor) -> bool:
    """True for a bitsandbytes parameter that holds quantized codes (4-bit or int8).

    Such a tensor cannot be trained in full: its storage is not the weight but its code. Use an
    adapter (LoRA / QLoRA, see :mod:`kappatune.integrations.peft`) for it instead. A
    bitsandbytes parameter that still holds a float weight (``Params4bit`` before quantization,
    ``Int8Params`` with ``has_fp16_weights=True``) is not quantized; an unknown bitsandbytes
    parameter class counts as quantized when its data is not floating point.

    Args:
        p (Tensor): a parameter (any tensor; ``False`` for everything that is not bitsandbytes').
    """
    if not _from_bnb(p):
        return False
    if _kind(p) is not None:
        return True
    import bitsandbytes as bnb

    if isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
        return False
    return not p.is_floating_point()


def _scb(name: str, p: torch.Tensor, owner: Optional[nn.Module]) -> torch.Tensor:
    scb = getattr(p, "SCB", None)
    if scb is None and owner is not None:
        scb = getattr(getattr(owner, "state", None), "SCB", None)
    if scb is None:
        raise ValueError(
            f"{name}: int8 weight without its SCB row scales (neither the parameter nor its layer's "
            "state has them), so it cannot be dequantized; load the model through "
            "BitsAndBytesConfig(load_in_8bit=True) or exclude this tensor (exclude=[...])"
        )
    return scb


def dequantize(p: torch.Tensor, name: str = "tensor", owner: Optional[nn.Module] = None) -> torch.Tensor:
    """The weight a quantized bitsandbytes parameter stands for, as the layer computes it.

    4-bit: ``bitsandbytes.functional.dequantize_4bit`` (in the quantization state's dtype);
    int8: ``Q · SCB / 127`` in float32. Raises :class:`ValueError` for a non-quantized tensor.
    """
    kind = _kind(p)
    if kind is None:
        raise ValueError(f"{name}: not a quantized bitsandbytes parameter (got {type(p).__name__}, dtype {p.dtype})")
    import bitsandbytes.functional as F

    with torch.no_grad():
        if kind == "4bit":
            if getattr(p.quant_state, "packing_format_for_cpu", False):
                return _dequantize_cpu_packed(p.data, p.quant_state, name)
            return F.dequantize_4bit(p.data, p.quant_state).detach()
        scb = _scb(name, p, owner)
        fn = getattr(F, "int8_vectorwise_dequant", None)
        if fn is not None:
            return fn(p.data, scb).detach()
        return p.data.float() * (scb.float().view(-1, 1) / 127.0)


def _dequantize_cpu_packed(data: torch.Tensor, qs, name: str) -> torch.Tensor:
    """Dequantize a 4-bit weight repacked by bitsandbytes for its AVX512-BF16 CPU kernel.

    On such CPUs the first inference-mode forward of a ``Linear4bit`` rewrites its weight in place
    into a ``(N, K/2)`` tiled layout (32-row tiles, low nibbles then high nibbles) with a
    transposed bfloat16 absmax of shape ``(K / blocksize, N)`` and no nested state;
    ``dequantize_4bit`` does not read that layout, so it is undone here, without touching the
    layer: ``W[n, k] = code[q[n, k]] · absmax[k // blocksize, n]``.
    """
    n, k = (int(s) for s in qs.shape)
    tile = 32
    bs = int(qs.blocksize)
    if data.dim() != 2 or tuple(data.shape) != (n, k // 2) or n % tile or k % bs:
        raise ValueError(f"{name}: unexpected CPU-packed 4-bit layout (data {tuple(data.shape)}, logical shape "
                         f"{(n, k)}, blocksize {bs}); this bitsandbytes version is not supported for it")
    packed = data.reshape(-1, tile)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)           # (N/32 · K/2, 64)
    codes = codes.reshape(n // tile, k // 2, tile, 2).transpose(1, 2).reshape(n, k)
    values = qs.code.to(torch.float32)[codes.long()].view(n, k // bs, bs)
    scale = qs.absmax.to(torch.float32).T.reshape(n, k // bs, 1)
    return (values * scale).reshape(n, k)


def _text_digest(lines: List[str]) -> str:
    """The cache's hash applied to a text record (so the result is a digest of the same kind)."""
    data = torch.frombuffer(bytearray("\n".join(lines).encode()), dtype=torch.uint8)
    return tensor_digest(data)


def _value(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return tensor_digest(x)
    return repr(x)


def _digest_4bit(p: torch.Tensor) -> str:
    qs = p.quant_state
    lines = [
        "kappatune-bnb-4bit/1",
        f"quant_type={qs.quant_type}", f"blocksize={qs.blocksize}",
        f"shape={tuple(qs.shape)}", f"dtype={qs.dtype}", f"storage={p.dtype}{tuple(p.shape)}",
        f"nested={bool(getattr(qs, 'nested', False))}",
        f"cpu_packed={bool(getattr(qs, 'packing_format_for_cpu', False))}",
        "data=" + tensor_digest(p.data),
        "absmax=" + _value(qs.absmax),
        "code=" + _value(qs.code),
        "offset=" + _value(getattr(qs, "offset", None)),
    ]
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        lines += [f"state2.blocksize={s2.blocksize}", "state2.absmax=" + _value(s2.absmax),
                  "state2.code=" + _value(s2.code), f"state2.dtype={getattr(s2, 'dtype', None)}"]
    return _text_digest(lines)


def _digest_int8(name: str, p: torch.Tensor, owner: Optional[nn.Module]) -> str:
    return _text_digest([
        "kappatune-bnb-int8/1",
        f"shape={tuple(p.shape)}",
        "data=" + tensor_digest(p.data),
        "SCB=" + tensor_digest(_scb(name, p, owner)),
    ])


def quantized_ref(name: str, p: torch.Tensor, owner: Optional[nn.Module]) -> Optional[TensorRef]:
    """A :class:`~kappatune.refs.TensorRef` that dequantizes ``p`` on load, or ``None``.

    ``None`` means ``p`` is not a quantized bitsandbytes parameter and is scanned as it is. The
    ref's ``shape`` is the logical (dequantized) shape, its ``dtype`` ``"nf4"``, ``"fp4"`` or
    ``"int8"``, its layout ``"matrix"``, and its digest covers the quantized bytes and the
    quantization state (see the module docstring).
    """
    kind = _kind(p)
    if kind is None:
        return None

    load: Callable[[], torch.Tensor] = lambda: dequantize(p, name, owner)  # noqa: E731
    if kind == "4bit":
        qs = p.quant_state
        shape = tuple(int(s) for s in qs.shape)
        dtype = str(qs.quant_type)
        digest: Callable[[], str] = lambda: _digest_4bit(p)  # noqa: E731
    else:
        shape = tuple(int(s) for s in p.shape)
        dtype = "int8"
        digest = lambda: _digest_int8(name, p, owner)  # noqa: E731
    if len(shape) != 2:
        logger.debug("%s: quantized weight of logical shape %s is not a matrix", name, shape)
    return TensorRef(name=name, shape=shape, dtype=dtype, load=load,
                     layout="matrix" if len(shape) == 2 else "auto", digest=digest, floating=True)
