"""Spectrum's signal-to-noise ratio of a weight matrix (Hartford et al., arXiv 2406.06623): a thin shim.

The implementation is kappatune's (:func:`kappatune.kappa.snr_of`, ``kappatune.scan(model,
score="snr")`` with its cache, and selection through ``KappaTable.select``, highest SNR first); this
module keeps the names that ``forgetting_v2.py``, ``forgetting.py`` and their tests use. The formula,
checked against the public Spectrum code (``spectrum.py`` of cognitivecomputations/spectrum):

* noise scale ``s = (Q75(σ) − Q25(σ)) / 1.349`` (linear-interpolation quantiles, as ``torch.quantile``);
* Marchenko–Pastur edge ``τ = s · (1 + √β)``, ``β = min(n, m) / max(n, m)``;
* ``SNR = (Σ_{σ_i > τ} σ_i / Σ_{σ_i ≤ τ} σ_i) / σ_1``, the noise sum 1 when no value is at or below τ.

Spectrum also unfreezes the embeddings and LM head; the forgetting study keeps them frozen (every arm
does).
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch

import kappatune
from kappatune.kappa import IQR_TO_SIGMA, mp_threshold, snr_from_singular_values  # noqa: F401  (re-exported)
from kappatune.kappa import snr_of as _snr_of


def snr_of(weight: torch.Tensor) -> float:
    """Spectrum's SNR of one 2-D weight (:func:`kappatune.kappa.snr_of`, float64 singular values)."""
    if weight.dim() != 2:
        raise ValueError(f"snr_of: expected a 2-D weight, got shape {tuple(weight.shape)}")
    return _snr_of(weight).snr


def snr_table(named: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """``{name: SNR}`` of every tensor in ``named`` (2-D weights), through ``kappatune.scan(score="snr")``."""
    table = kappatune.scan(dict(named), score="snr", cache=False, progress=False)
    return {n: table[n].snr for n in named}


def rank_within_kind(snr: Mapping[str, float], kind_of) -> Dict[str, Tuple[str, ...]]:
    """``{kind: names, highest SNR first}`` (ties by name), the order Spectrum uses per module type."""
    out: Dict[str, list] = {}
    for n in snr:
        out.setdefault(kind_of(n), []).append(n)
    return {k: tuple(sorted(v, key=lambda n: (-snr[n], n))) for k, v in sorted(out.items())}
