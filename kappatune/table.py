"""The κ table: one :class:`KappaEntry` per analysed tensor, ordered best first by a :class:`Score`.

A :class:`KappaTable` is what :func:`kappatune.scan` returns. It is ordered by the table's score
(ties broken by name, unknown values last):

* ``"kappa"`` (the default): the condition number :math:`\\kappa = \\sigma_{\\max}/\\sigma_{\\min}`,
  **lowest first** (``inf`` last);
* ``"snr"`` (``kappatune.scan(model, score="snr")``): Spectrum's signal-to-noise ratio
  (:func:`kappatune.kappa.snr_of`), **highest first**, as Spectrum ranks matrices.

:meth:`KappaTable.select` applies one :class:`~kappatune.selection.SelectionPolicy` (the rules live
there) to the table.

Example::

    >>> table = kappatune.scan(model)
    >>> table[0].name, table[0].kappa                 # the best-conditioned tensor
    >>> names = table.select(param_budget=0.05, group_by="kind")
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ._numbers import decode_float, encode_float
from .refs import GroupBy, NameFilter, Patterns, layer_index, module_kind

__all__ = ["KappaTable", "KappaEntry", "Score", "SCORES"]


@dataclass(frozen=True)
class Score:
    """A per-tensor score a :class:`KappaTable` is ordered and selected by.

    Args:
        name (str): the :class:`KappaEntry` field holding it (``"kappa"``, ``"snr"``).
        symbol (str): how tables and messages write it (``"κ"``, ``"SNR"``).
        higher_first (bool): ``True``: the highest value ranks first (SNR); ``False``: the lowest (κ).
        description (str): one line on what it measures.

    The registered scores are in :data:`SCORES`.
    """

    name: str
    symbol: str
    higher_first: bool
    description: str

    def key(self, value: float) -> float:
        """An ascending sort key: best first, NaN (unknown) last, like ``inf`` for κ.

        Args:
            value (float): a value of this score.
        """
        if math.isnan(value):
            return math.inf
        return -value if self.higher_first else value


SCORES: Dict[str, Score] = {
    "kappa": Score("kappa", "κ", False, "condition number σ_max/σ_min; lowest first"),
    "snr": Score("snr", "SNR", True, "Spectrum's signal-to-noise ratio of the singular values; highest first"),
}
"""The scores a table can hold, by name: ``"kappa"`` (lowest first) and ``"snr"`` (highest first)."""


def _score(name: str, arg: str = "score") -> Score:
    try:
        return SCORES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, SCORES))}, got {name!r}") from None


@dataclass(frozen=True)
class KappaEntry:
    """One analysed tensor and its score.

    ``score`` names the field the entry is ranked by (:data:`SCORES`): ``"kappa"`` (``kappa``
    holds κ) or ``"snr"`` (``snr`` holds Spectrum's SNR and ``kappa`` is NaN: an SNR scan does not
    compute κ). ``per_matrix`` holds the per-matrix values of that score for a stacked 3-D
    parameter (one per expert).

    Attributes:
        name (str): the parameter's name.
        kappa (float): :math:`\\kappa = \\sigma_{\\max}/\\sigma_{\\min}` (``inf`` for a rank-deficient
            matrix; for a stack the aggregate, mean or max, of ``per_matrix``); NaN in an SNR entry.
        shape (Tuple[int, ...]): the tensor's shape.
        numel (int): its number of elements, :math:`\\prod_i \\text{shape}_i`.
        dtype (str): its dtype name, e.g. ``"bfloat16"``.
        layout (str, optional): how it was read as matrices: ``"matrix"``, ``"flatten"`` or
            ``"stack"`` (:mod:`kappatune.refs`). Default: ``"matrix"``.
        sigma_max (float, optional): the largest singular value :math:`\\sigma_{\\max}` (over the
            stack). Default: NaN (unknown).
        sigma_min (float, optional): the smallest singular value :math:`\\sigma_{\\min}` (over the
            stack; NaN in an SNR entry). Default: NaN (unknown).
        per_matrix (Tuple[float, ...], optional): the score of each matrix of a ``"stack"``.
            Default: ``None`` (a single matrix).
        digest (str, optional): the content digest the κ cache keys it by
            (:func:`kappatune.cache.tensor_digest`). Default: ``None`` (not computed).
        snr (float, optional): Spectrum's SNR, :math:`\\text{signal}/\\text{noise}/\\sigma_{\\max}`
            (:func:`kappatune.kappa.snr_of`), in an SNR entry. Default: NaN (a κ entry).
        score (str, optional): the field the entry is ranked by, a key of :data:`SCORES`.
            Default: ``"kappa"``.

    Raises:
        ValueError: ``score`` not a key of :data:`SCORES`.
    """

    name: str
    kappa: float
    shape: Tuple[int, ...]
    numel: int
    dtype: str
    layout: str = "matrix"
    sigma_max: float = float("nan")
    sigma_min: float = float("nan")
    per_matrix: Optional[Tuple[float, ...]] = None
    digest: Optional[str] = None
    snr: float = float("nan")
    score: str = "kappa"

    def __post_init__(self) -> None:
        _score(self.score)

    def __float__(self) -> float:
        return float(self.value)

    @property
    def value(self) -> float:
        """The value of the entry's score (κ, or the SNR)."""
        return float(getattr(self, self.score))

    @property
    def kind(self) -> str:
        """:func:`module_kind` of the name."""
        return module_kind(self.name)

    @property
    def layer(self) -> Optional[int]:
        """:func:`layer_index` of the name."""
        return layer_index(self.name)

    def to_dict(self) -> Dict[str, Any]:
        """The entry as strict-JSON values: ``inf``/NaN as the strings ``"inf"``/``"nan"``, the shape
        and ``per_matrix`` as lists; ``snr`` and ``score`` only for an SNR entry (or a known SNR)."""
        enc = encode_float
        d = {
            "name": self.name, "kappa": enc(self.kappa), "shape": list(self.shape), "numel": self.numel,
            "dtype": self.dtype, "layout": self.layout, "sigma_max": enc(self.sigma_max),
            "sigma_min": enc(self.sigma_min),
            "per_matrix": None if self.per_matrix is None else [enc(v) for v in self.per_matrix],
            "digest": self.digest,
        }
        if self.score != "kappa" or not math.isnan(self.snr):  # a κ entry is written as before
            d.update(snr=enc(self.snr), score=self.score)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KappaEntry":
        """The inverse of :meth:`to_dict`.

        Args:
            d (Mapping[str, Any]): a dict from :meth:`to_dict` (``name``, ``kappa``, ``shape`` and
                ``numel`` required; the other fields take their defaults when absent).

        Raises:
            KeyError: a required field missing.
            ValueError: a value that is not a number nor ``"inf"``/``"-inf"``/``"nan"``, or an unknown
                ``score``.
        """
        pm = d.get("per_matrix")
        return cls(
            name=str(d["name"]), kappa=decode_float(d["kappa"]), shape=tuple(int(s) for s in d["shape"]),
            numel=int(d["numel"]), dtype=str(d.get("dtype", "")), layout=str(d.get("layout", "matrix")),
            sigma_max=decode_float(d.get("sigma_max", "nan")), sigma_min=decode_float(d.get("sigma_min", "nan")),
            per_matrix=None if pm is None else tuple(decode_float(v) for v in pm), digest=d.get("digest"),
            snr=decode_float(d.get("snr", "nan")), score=str(d.get("score", "kappa")),
        )


def _sort_key(e: KappaEntry) -> Tuple[float, str]:
    return (SCORES[e.score].key(e.value), e.name)




class KappaTable(Sequence[KappaEntry]):
    """The score of every analysed tensor, best first (ties by name). Indexable by position or name.

    Args:
        entries (Iterable[KappaEntry]): one per tensor, all of one score.
        skipped (Optional[Mapping[str, str]]): each parameter that was not analysed and why
            (``"ndim<2"``, ``"max_dim"``, ``"excluded"``, ``"not included"``, …). Default: ``None``.
        score (Optional[str]): the score the table ranks by (:data:`SCORES`). Default: ``None``:
            that of the entries, ``"kappa"`` for none.

    A κ table (``kappatune.scan(model)``) is ordered lowest κ first, an SNR table
    (``kappatune.scan(model, score="snr")``) highest SNR first (:attr:`score`); every policy of
    :meth:`select` takes the table's best first.

    Raises:
        ValueError: a name given twice, entries of several scores, or entries of another score than
            ``score``.
    """

    def __init__(self, entries: Iterable[KappaEntry], skipped: Optional[Mapping[str, str]] = None, *,
                 score: Optional[str] = None) -> None:
        entries = list(entries)
        kinds = sorted({e.score for e in entries})
        if len(kinds) > 1 or (score is not None and kinds and kinds != [score]):
            raise ValueError(f"a table holds one score: got entries of {', '.join(map(repr, kinds))}"
                             + (f" for score={score!r}" if score is not None else ""))
        self._score: Score = _score(score if score is not None else (kinds[0] if kinds else "kappa"))
        self._entries: List[KappaEntry] = sorted(entries, key=_sort_key)
        self._by_name: Dict[str, KappaEntry] = {}
        for e in self._entries:
            if e.name in self._by_name:
                raise ValueError(f"duplicate tensor name in κ table: {e.name!r}")
            self._by_name[e.name] = e
        self.skipped: Dict[str, str] = dict(skipped or {})

    @property
    def score(self) -> Score:
        """The :class:`Score` the table is ordered by (``table.score.name``: ``"kappa"`` or ``"snr"``)."""
        return self._score

    # -- container -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[KappaEntry]:
        return iter(self._entries)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"{key!r} is not in the κ table ({len(self)} tensors)") from None
        return self._entries[key]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> List[str]:
        """Names, best first (lowest κ, or highest SNR)."""
        return [e.name for e in self._entries]

    @property
    def kappas(self) -> Dict[str, float]:
        """``{name: κ}`` in table order (NaN in an SNR table)."""
        return {e.name: e.kappa for e in self._entries}

    @property
    def values(self) -> Dict[str, float]:
        """``{name: value of the table's score}``, best first."""
        return {e.name: e.value for e in self._entries}

    @property
    def total_numel(self) -> int:
        return sum(e.numel for e in self._entries)

    def __repr__(self) -> str:
        if not self._entries:
            return f"KappaTable(0 tensors, {len(self.skipped)} skipped)"
        sym = self._score.symbol
        finite = [e.value for e in self._entries if math.isfinite(e.value)]
        rng = (f"{sym} {finite[0]:.4g} … {finite[-1]:.4g}, median {statistics.median(finite):.4g}" if finite
               else f"{sym} all inf")
        if self._score.higher_first:
            rng += " (highest first)"
        n_inf = len(self._entries) - len(finite)
        inf = f", {n_inf} {'rank-deficient' if self._score.name == 'kappa' else 'infinite'}" if n_inf else ""
        return (f"KappaTable({len(self)} tensors, {self.total_numel:,} params, {rng}{inf}, "
                f"{len(self.skipped)} skipped)")

    def format(self, top: Optional[int] = None, selected: Iterable[str] = ()) -> str:
        """A plain-text table: rank, name, shape, params, the score (κ or SNR), selected.

        Args:
            top (Optional[int]): only the first ``top`` rows. Default: ``None`` (all).
            selected (Iterable[str]): names marked ``*``. Default: none.
        """
        sel = set(selected)
        rows = self._entries if top is None else self._entries[:top]
        w = max([len(e.name) for e in rows] + [4])
        lines = [f"{'rank':>4}  {'name':<{w}}  {'shape':<16}  {'params':>12}  {self._score.name:>11}  sel"]
        for i, e in enumerate(rows, 1):
            shape = "x".join(map(str, e.shape))
            lines.append(f"{i:>4}  {e.name:<{w}}  {shape:<16}  {e.numel:>12,}  {e.value:>11.5g}  "
                         f"{'*' if e.name in sel else ''}")
        return "\n".join(lines)

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """``{"entries": [...], "skipped": {...}}`` in strict JSON values (:meth:`KappaEntry.to_dict`),
        best first, with ``"score"`` for a table of another score than κ."""
        d: Dict[str, Any] = {"entries": [e.to_dict() for e in self._entries], "skipped": dict(self.skipped)}
        if self._score.name != "kappa":  # a κ table is written as before
            d["score"] = self._score.name
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KappaTable":
        """The inverse of :meth:`to_dict`.

        Args:
            d (Mapping[str, Any]): a dict from :meth:`to_dict` (``"skipped"`` and ``"score"`` optional).

        Raises:
            KeyError: no ``"entries"``, or an entry without a required field.
            ValueError: as :class:`KappaTable` and :meth:`KappaEntry.from_dict`.
        """
        return cls([KappaEntry.from_dict(e) for e in d["entries"]], d.get("skipped") or {},
                   score=d.get("score"))

    def subset(self, names: Iterable[str]) -> "KappaTable":
        """A table of only ``names`` (each must be present), of the same score.

        Args:
            names (Iterable[str]): names of entries of this table.

        Raises:
            KeyError: a name not in the table.
        """
        return KappaTable([self[n] for n in names], score=self._score.name)

    # -- selection ---------------------------------------------------------------------
    def select(
        self,
        policy: Optional[Any] = None,
        *,
        num_tensors: Optional[int] = None,
        top_fraction: Optional[float] = None,
        param_budget: Optional[Union[int, float]] = None,
        max_kappa: Optional[float] = None,
        include: Patterns = None,
        exclude: Patterns = None,
        group_by: GroupBy = None,
    ) -> List[str]:
        """Names chosen by exactly one policy, best first (see the module docstring).

        "Best" is the table's order (:attr:`score`): lowest κ in a κ table, highest SNR in an SNR
        table.

        Args:
            policy (Optional[SelectionPolicy]): a prepared policy (default ``None``: built from
                the keyword arguments below, which must then name exactly one policy).
            num_tensors (Optional[int]): the ``k`` best tensors (default ``None``; see
                :class:`SelectionPolicy` for every policy).
            top_fraction (Optional[float]): the best ``ceil(f · N)`` of the ``N``
                candidates (default ``None``).
            param_budget (Optional[Union[int, float]]): a parameter budget, a fraction
                ``0 < b <= 1`` of the candidates' parameters or a count (default ``None``).
            max_kappa (Optional[float]): every tensor with ``κ <= t``; κ tables only (default
                ``None``).
            include (None, str or sequence of str): regexes (``re.search`` on the name) a
                candidate must match (see :class:`NameFilter`; default ``None``).
            exclude (None, str or sequence of str): regexes that leave a candidate out
                (default ``None``).
            group_by (None, str or Callable[[str], Any]): apply the policy per ``"kind"``, per
                ``"layer"`` or per key of a callable (default ``None``); a ``param_budget`` is then
                filled group by group (:class:`SelectionPolicy`).

        Raises:
            ValueError: no policy or several, an invalid value, ``max_kappa`` on a table of
                another score, or nothing selectable.
        """
        from .selection import SelectionPolicy  # the rules; the table does not import them until asked

        policy = SelectionPolicy.resolve(policy, group_by=group_by, num_tensors=num_tensors,
                                         top_fraction=top_fraction, param_budget=param_budget, max_kappa=max_kappa)
        return policy.apply(self, NameFilter(include, exclude))
