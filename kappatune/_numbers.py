"""The rules on scores as numbers, each written once (private; no torch).

* :func:`encode_float` / :func:`decode_float`: κ = ∞ (a rank-deficient weight) and NaN (an
  unknown value) in strict JSON files: the κ cache, saved scans, exports, deltas;
* :func:`aggregate_values`: the one value of a stacked parameter (experts) from its per-matrix
  values, for κ and the SNR, computed and validated alike.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

__all__ = ["encode_float", "decode_float", "aggregate_values"]


def encode_float(x: float) -> Union[float, str]:
    """A float for strict JSON: ``inf``/``-inf``/``nan`` become the strings ``"inf"``, ``"-inf"``,
    ``"nan"`` (κ = ∞ is a rank-deficient weight; NaN an unknown value); finite values stay numbers."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def decode_float(x: Any) -> float:
    """The inverse of :func:`encode_float`; also reads plain numbers and any string ``float()`` reads
    (``"Infinity"``, ``"NaN"``, ``"1.5"``), as the readers of saved scans always did.

    Raises:
        ValueError: anything else (e.g. ``True``, ``None``, ``"abc"``).
    """
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise ValueError(f"expected a number or 'inf'/'-inf'/'nan', got {x!r}")
    return float(x)


def aggregate_values(values: Sequence[float], aggregate: str = "mean") -> float:
    """The one value of a stacked parameter from its per-matrix values (κ or SNR).

    Args:
        values (Sequence[float]): one value per matrix (at least one).
        aggregate (str, optional): ``"max"``, or ``"mean"``: :math:`\\frac{1}{B}\\sum_b v_b`,
            summed exactly (``math.fsum``), ``inf`` when any value is. Default: ``"mean"``.
    """
    if aggregate == "max":
        return max(values)
    return math.inf if any(math.isinf(v) for v in values) else math.fsum(values) / len(values)
