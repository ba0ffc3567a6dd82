"""Spectrum's signal-to-noise ratio of a weight matrix (Hartford et al., arXiv 2406.06623), our implementation.

Spectrum ranks the matrices of each module type by an SNR read off their singular values and
trains the highest-SNR ones. For a matrix ``W`` of shape ``(n, m)`` with singular values
``σ_1 ≥ … ≥ σ_k`` (``k = min(n, m)``):

* noise scale from the interquartile range of the singular values (a robust Gaussian σ):
  ``s = (Q75(σ) − Q25(σ)) / 1.349`` (quantiles with linear interpolation, as ``torch.quantile``);
* Marchenko–Pastur edge for a pure-noise ``n × m`` matrix with entries of scale ``s``:
  ``τ = s · (1 + √β)``, ``β = min(n, m) / max(n, m)``;
* ``SNR = (Σ_{σ_i > τ} σ_i  /  Σ_{σ_i ≤ τ} σ_i) / σ_1``.

Facts checked against the public Spectrum code (``spectrum.py`` of cognitivecomputations/spectrum):
the threshold is ``s · sqrt((1 + sqrt(β))²)``, the noise sum falls back to 1 when no singular value is
at or below the threshold, and the ratio is divided by the largest singular value. Spectrum also
unfreezes the embeddings and LM head; the forgetting study keeps them frozen (every arm does).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Sequence, Tuple

import numpy as np
import torch

IQR_TO_SIGMA = 1.349   # IQR of a standard normal


def mp_threshold(sigma: float, shape: Sequence[int]) -> float:
    """Marchenko–Pastur edge ``σ · (1 + √β)`` with ``β = min/max`` of the last two dims of ``shape``."""
    n, m = int(shape[-2]), int(shape[-1])
    beta = min(n, m) / max(n, m)
    return float(sigma) * (1.0 + math.sqrt(beta))


def snr_from_singular_values(s: Iterable[float], shape: Sequence[int]) -> float:
    """Spectrum's SNR from the singular values ``s`` (any order) of a matrix of ``shape``.

    Args:
        s (iterable of float): the singular values, all of them (``min(n, m)`` values).
        shape (sequence of int): the matrix shape ``(n, m)`` (only the last two dims are read).

    Returns:
        float: ``(Σ σ_i > τ) / (Σ σ_i ≤ τ) / σ_max`` with ``τ`` the Marchenko–Pastur edge of the IQR
        noise estimate (module docstring); ``0.0`` for an all-zero matrix.
    """
    v = np.sort(np.asarray(list(s), dtype=np.float64))[::-1]
    if v.size == 0:
        raise ValueError("snr_from_singular_values: no singular values given")
    smax = float(v[0])
    if smax <= 0:
        return 0.0
    q75, q25 = np.quantile(v, [0.75, 0.25])      # numpy's default is linear interpolation, as torch.quantile
    tau = mp_threshold((q75 - q25) / IQR_TO_SIGMA, shape)
    signal = float(v[v > tau].sum())
    below = v[v <= tau]
    noise = float(below.sum()) if below.size else 1.0
    if noise == 0.0:
        return math.inf
    return signal / noise / smax


def snr_of(weight: torch.Tensor) -> float:
    """Spectrum's SNR of one 2-D weight (singular values in float64 on the weight's device)."""
    if weight.dim() != 2:
        raise ValueError(f"snr_of: expected a 2-D weight, got shape {tuple(weight.shape)}")
    s = torch.linalg.svdvals(weight.detach().to(torch.float64 if weight.device.type == "cpu" else torch.float32))
    return snr_from_singular_values(s.cpu().tolist(), tuple(weight.shape))


def snr_table(named: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """``{name: SNR}`` of every tensor in ``named`` (2-D weights)."""
    return {n: snr_of(w) for n, w in named.items()}


def rank_within_kind(snr: Mapping[str, float], kind_of) -> Dict[str, Tuple[str, ...]]:
    """``{kind: names, highest SNR first}`` (ties by name), the order Spectrum uses per module type."""
    out: Dict[str, list] = {}
    for n in snr:
        out.setdefault(kind_of(n), []).append(n)
    return {k: tuple(sorted(v, key=lambda n: (-snr[n], n))) for k, v in sorted(out.items())}
