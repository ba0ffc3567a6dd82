"""The κ table and the selection policies.

A :class:`KappaTable` holds one :class:`KappaEntry` per analysed tensor, ordered best first by the
table's :class:`Score` (ties broken by name, unknown values last):

* ``"kappa"`` (:func:`kappatune.scan`'s default): the condition number
  :math:`\\kappa = \\sigma_{\\max}/\\sigma_{\\min}`, **lowest first** (``inf`` last);
* ``"snr"`` (``kappatune.scan(model, score="snr")``): Spectrum's signal-to-noise ratio
  (:func:`kappatune.kappa.snr_of`), **highest first**, as Spectrum ranks matrices.

:meth:`KappaTable.select` turns a table into a list of names with exactly one policy; "best" is the
table's order, so the same policy selects the lowest-κ tensors of a κ table and the highest-SNR
tensors of an SNR table:

* ``num_tensors=k``: the ``k`` best tensors;
* ``top_fraction=f``: the best ``ceil(f · N)`` of the ``N`` tensors;
* ``param_budget=b``: walking from the best down, every tensor that still fits in a budget of
  ``b`` parameters (a float ``0 < b <= 1``: a fraction of the eligible parameters; an int: a count);
* ``max_kappa=t``: every tensor with ``κ <= t`` (κ tables only).

``group_by="kind"`` (q_proj, up_proj, …) or ``"layer"`` applies the policy within each group, so a
budget is spread over the module kinds (as Spectrum does per layer type) instead of being taken by
the kind whose matrices happen to score best. A ``param_budget`` over groups is filled kind by kind
(:class:`SelectionPolicy`): each group's proportional share first, then what is left round-robin.

Example::

    >>> names = table.select(param_budget=0.05, group_by="kind")
    >>> snr = kappatune.scan(model, score="snr")
    >>> names = snr.select(top_fraction=0.25, group_by="kind")   # Spectrum's top quarter per kind
    >>> handle = kappatune.freeze_all_but(model, names)
    >>> ...  # train
    >>> handle.restore()
"""

from __future__ import annotations

import collections
import logging
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

__all__ = ["KappaEntry", "KappaTable", "SelectionPolicy", "NameFilter", "FreezeHandle", "freeze_all_but",
           "module_kind", "layer_index", "compile_patterns", "kappa_sort_key", "Score", "SCORES"]

logger = logging.getLogger(__name__)

_PARAM_LEAVES = {"weight", "bias"}
_INT = re.compile(r"^\d+$")


def module_kind(name: str) -> str:
    """The module kind of a parameter name: ``model.layers.3.self_attn.q_proj.weight`` → ``q_proj``.

    A parameter that is not called ``weight``/``bias`` is its own kind
    (``model.layers.0.mlp.experts.gate_up_proj`` → ``gate_up_proj``).
    """
    parts = [p for p in name.split(".") if not _INT.match(p)]
    if len(parts) > 1 and parts[-1] in _PARAM_LEAVES:
        return parts[-2]
    return parts[-1] if parts else name


def layer_index(name: str) -> Optional[int]:
    """The first integer component of a parameter name (``model.layers.3.…`` → 3), or ``None``."""
    for p in name.split("."):
        if _INT.match(p):
            return int(p)
    return None


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
        def enc(x: float) -> Any:
            return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else x)

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
        pm = d.get("per_matrix")
        return cls(
            name=str(d["name"]), kappa=float(d["kappa"]), shape=tuple(int(s) for s in d["shape"]),
            numel=int(d["numel"]), dtype=str(d.get("dtype", "")), layout=str(d.get("layout", "matrix")),
            sigma_max=float(d.get("sigma_max", "nan")), sigma_min=float(d.get("sigma_min", "nan")),
            per_matrix=None if pm is None else tuple(float(v) for v in pm), digest=d.get("digest"),
            snr=float(d.get("snr", "nan")), score=str(d.get("score", "kappa")),
        )


def kappa_sort_key(kappa: float) -> float:
    """The order of κ values in tables and selections: ascending, NaN (unknown) last with ``inf``."""
    return math.inf if math.isnan(kappa) else kappa


def _sort_key(e: KappaEntry) -> Tuple[float, str]:
    return (SCORES[e.score].key(e.value), e.name)


GroupBy = Union[None, str, Callable[[str], Any]]
Patterns = Union[None, str, Sequence[str]]


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
        d: Dict[str, Any] = {"entries": [e.to_dict() for e in self._entries], "skipped": dict(self.skipped)}
        if self._score.name != "kappa":  # a κ table is written as before
            d["score"] = self._score.name
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KappaTable":
        return cls([KappaEntry.from_dict(e) for e in d["entries"]], d.get("skipped") or {},
                   score=d.get("score"))

    def subset(self, names: Iterable[str]) -> "KappaTable":
        """A table of only ``names`` (each must be present), of the same score."""
        return KappaTable([self[n] for n in names], score=self._score.name)

    # -- selection ---------------------------------------------------------------------
    def select(
        self,
        policy: Optional["SelectionPolicy"] = None,
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
        if policy is None:
            policy = SelectionPolicy(num_tensors=num_tensors, top_fraction=top_fraction,
                                     param_budget=param_budget, max_kappa=max_kappa, group_by=group_by)
        elif not isinstance(policy, SelectionPolicy):
            raise TypeError(f"policy must be a SelectionPolicy, got {type(policy).__name__}")
        elif any(v is not None for v in (num_tensors, top_fraction, param_budget, max_kappa, group_by)):
            raise ValueError("give a SelectionPolicy or policy keyword arguments, not both")
        return policy.apply(self, NameFilter(include, exclude))


_POLICY_NAMES = ("num_tensors", "top_fraction", "param_budget", "max_kappa")


def _validate_value(policy: str, value: Any) -> None:
    if policy == "num_tensors":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"num_tensors must be an int >= 1, got {value!r}")
    elif policy == "top_fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {value!r}")
    elif policy == "param_budget":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"param_budget must be a float fraction in (0, 1] or an int parameter count >= 1, "
                             f"got {value!r}")
        if isinstance(value, float) and value > 1 and not value.is_integer():
            raise ValueError(f"param_budget > 1 is a parameter count and must be whole, got {value!r}")
    elif policy == "max_kappa":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
            raise ValueError(f"max_kappa must be a number > 0, got {value!r}")


def compile_patterns(patterns: Patterns, arg: str) -> List["re.Pattern[str]"]:
    """``include=``/``exclude=`` regexes (one string or a sequence), compiled.

    Args:
        patterns (None, str or sequence of str): the regexes (default none).
        arg (str): names the argument in errors (``"include"``, ``"--exclude"``, …).

    Raises:
        ValueError: a pattern that is not a valid regular expression, naming ``arg``.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    elif isinstance(patterns, bytes) or not isinstance(patterns, Iterable):
        raise TypeError(f"{arg} must be a regex string or a sequence of them, got {type(patterns).__name__}")
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must be a regex string or a sequence of them, got an element of type "
                            f"{type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{arg}: invalid regular expression {p!r}: {e}") from None
    return out


def _check_one(options: Any, alternative: str) -> None:
    get = options.get if isinstance(options, Mapping) else (lambda k: getattr(options, k))
    given = [k for k in _POLICY_NAMES if get(k) is not None]
    if len(given) != 1:
        alt = f" or {alternative}" if alternative else ""
        raise ValueError("choose what to train with exactly one selection policy: num_tensors=, top_fraction=, "
                         f"param_budget=, max_kappa={alt}; " + (f"got {', '.join(given)}" if given else "got none"))


class NameFilter:
    """The include/exclude rule on tensor names, shared by the scan, the table, the CLI and PEFT.

    A name passes when it matches (``re.search``) at least one ``include`` pattern (or none are
    given) and no ``exclude`` pattern.

    Args:
        include (None, str or sequence of str): regexes a name must match one of (default ``None``:
            every name).
        exclude (None, str or sequence of str): regexes no name may match (default ``None``).
        arg_names (Tuple[str, str]): how the two arguments are named in errors (default
            ``("include", "exclude")``; the CLI passes ``("--include", "--exclude")``).
    """

    def __init__(self, include: Patterns = None, exclude: Patterns = None, *,
                 arg_names: Tuple[str, str] = ("include", "exclude")) -> None:
        self.include = include
        self.exclude = exclude
        self._inc = compile_patterns(include, arg_names[0])
        self._exc = compile_patterns(exclude, arg_names[1])

    def reason(self, name: str) -> Optional[str]:
        """Why ``name`` is filtered out (``"not included"`` or ``"excluded"``), or ``None`` if it passes."""
        if self._inc and not any(r.search(name) for r in self._inc):
            return "not included"
        if any(r.search(name) for r in self._exc):
            return "excluded"
        return None

    def __call__(self, name: str) -> bool:
        return self.reason(name) is None

    @property
    def active(self) -> bool:
        """Whether any pattern is set."""
        return bool(self._inc or self._exc)

    def __repr__(self) -> str:
        return f"NameFilter(include={self.include!r}, exclude={self.exclude!r})"


@dataclass(frozen=True)
class SelectionPolicy:
    """Which tensors of a :class:`KappaTable` to train: exactly one policy, optionally per group.

    Every policy walks the table best first: lowest κ in a κ table, highest SNR in an SNR table
    (:attr:`KappaTable.score`).

    Args:
        num_tensors (Optional[int]): the ``k`` best tensors (default ``None``).
        top_fraction (Optional[float]): the best ``ceil(f · N)`` of the ``N`` candidates,
            ``0 < f <= 1`` (default ``None``).
        param_budget (Optional[Union[int, float]]): walking from the best down, every tensor
            that still fits in ``b`` parameters: a float ``0 < b <= 1`` is a fraction of the
            candidates' parameters, a whole number ``>= 1`` a count (default ``None``).
        max_kappa (Optional[float]): every tensor with ``κ <= t``; κ tables only (default ``None``).
        group_by (None, ``"kind"``, ``"layer"`` or Callable[[str], Any]): apply the policy within
            each module kind, each layer, or each key of a callable ``name -> key`` (default ``None``:
            over all candidates at once).

    A ``param_budget`` with ``group_by`` is filled group by group. Let :math:`B` be the whole
    budget (:math:`b` times the candidates' parameters :math:`P` for a fraction, :math:`b` for a
    count) and :math:`P_g` the parameters of group :math:`g`:

    1. **shares**: each group walks its own tensors best first and keeps every one that fits in
       its share :math:`B\\,P_g / P` (for a fraction, :math:`b\\,P_g`: the same fraction of every
       group);
    2. **fill**: what is left of :math:`B` is filled round-robin. In each round every group that
       has tensors left, in the order of its best remaining tensor (ties by that tensor's name),
       drops the remaining tensors that no longer fit and adds its best one that does; rounds
       repeat until no group can add one.

    So a budget below one tensor per group's share does not select nothing: every group is offered
    its best tensor in turn (``select(param_budget=b, group_by="kind")`` then takes the best tensor
    of as many kinds as fit). The selection never exceeds :math:`B`.

    Raises:
        ValueError: at construction, for no policy or several, an invalid value or ``group_by``.
    """

    num_tensors: Optional[int] = None
    top_fraction: Optional[float] = None
    param_budget: Optional[Union[int, float]] = None
    max_kappa: Optional[float] = None
    group_by: GroupBy = None

    def __post_init__(self) -> None:
        _check_one(self, "")
        _validate_value(self.name, self.value)
        if self.group_by is not None:
            _group_key(self.group_by)

    @classmethod
    def build(cls, alternative: str = "", **options: Any) -> "SelectionPolicy":
        """Like the constructor, ``alternative`` naming another way to choose in the error message.

        Args:
            alternative (str): e.g. ``"names= (an explicit list of parameter names)"`` (default ``""``).
            **options: the constructor's arguments; ``None`` values count as not given.
        """
        unknown = sorted(set(options) - {*_POLICY_NAMES, "group_by"})
        if unknown:
            raise TypeError(f"unknown selection option(s): {', '.join(unknown)}")
        _check_one(options, alternative)
        return cls(**options)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Optional["SelectionPolicy"]:
        """The policy named in a mapping of options (other keys ignored), or ``None`` if it names none."""
        kw = {k: options.get(k) for k in (*_POLICY_NAMES, "group_by")}
        if all(kw[k] is None for k in _POLICY_NAMES):
            return None
        return cls(**kw)

    @property
    def name(self) -> str:
        """The policy given: ``"num_tensors"``, ``"top_fraction"``, ``"param_budget"`` or ``"max_kappa"``."""
        return next(k for k in _POLICY_NAMES if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        """Its value."""
        return getattr(self, self.name)

    def to_dict(self) -> Dict[str, Any]:
        """``{policy: value, "group_by": ...}`` (a callable ``group_by`` is recorded by its name)."""
        gb = self.group_by
        return {self.name: self.value, "group_by": gb if gb is None or isinstance(gb, str) else repr(gb)}

    def apply(self, table: "KappaTable", names: Optional[NameFilter] = None) -> List[str]:
        """The names this policy selects from ``table`` (candidates passing ``names``), best first.

        Args:
            table (KappaTable): the candidates, in the order of their score.
            names (Optional[NameFilter]): include/exclude patterns (default ``None``: every name).

        Raises:
            ValueError: ``max_kappa`` on a table of another score, or nothing selectable, saying why.
        """
        policy, value, group_by = self.name, self.value, self.group_by
        names = names if names is not None else NameFilter()
        if policy == "max_kappa" and table.score.name != "kappa":
            raise ValueError(f"max_kappa= is a κ threshold, but this table holds {table.score.symbol} "
                             f"(scan(..., score={table.score.name!r})); use num_tensors=, top_fraction= or "
                             "param_budget=, or a κ table")
        cands = [e for e in table if names(e.name)]
        if not cands:
            raise ValueError(
                f"nothing selectable: none of the {len(table)} tensors in the κ table passes "
                f"include={names.include!r} / exclude={names.exclude!r}"
                + ("" if len(table) else "; the scan analysed no tensor (check the scan filters, e.g. max_dim)")
            )
        if group_by is None:
            groups: Dict[Any, List[KappaEntry]] = {None: cands}
        else:
            keyf = _group_key(group_by)
            groups = {}
            for e in cands:
                groups.setdefault(keyf(e.name), []).append(e)
        total = sum(e.numel for e in cands)
        chosen: List[KappaEntry] = []
        for members in groups.values():
            chosen.extend(_apply(policy, value, members, total, grouped=group_by is not None))
        if policy == "param_budget" and group_by is not None:
            chosen = _fill_round_robin(list(groups.values()), chosen, _budget(value, total))
        if not chosen:
            if policy == "max_kappa":
                raise ValueError(f"nothing selectable: no tensor has κ <= {value:g} "
                                 f"(lowest κ is {cands[0].kappa:.4g} for {cands[0].name!r})")
            smallest = min(cands, key=lambda e: e.numel)
            raise ValueError(f"nothing selectable: param_budget={value!r} is smaller than the smallest "
                             f"eligible tensor (smallest: {smallest.name!r}, {smallest.numel:,} params)")
        taken = {e.name for e in chosen}
        return [e.name for e in table if e.name in taken]  # the table's order: best first


def _group_key(group_by: GroupBy) -> Callable[[str], Any]:
    if callable(group_by):
        return group_by
    if group_by == "kind":
        return module_kind
    if group_by == "layer":
        return layer_index
    raise ValueError(f"group_by must be None, 'kind', 'layer' or a callable name -> key, got {group_by!r}")


def _apply(policy: str, value: Any, members: List[KappaEntry], total: int, grouped: bool) -> List[KappaEntry]:
    n = len(members)
    if policy == "num_tensors":
        if value > n and not grouped:
            logger.warning("num_tensors=%d exceeds the %d eligible tensors: selecting all of them", value, n)
        return members[:value]
    if policy == "top_fraction":
        return members[: max(1, math.ceil(value * n - 1e-9))]
    if policy == "max_kappa":
        return [e for e in members if e.kappa <= value]
    # param_budget
    group_total = sum(e.numel for e in members)
    if _is_fraction(value):  # a fraction of the eligible parameters
        budget = value * group_total
    else:  # an absolute count, split over groups in proportion to their size
        budget = value * group_total / total if grouped else value
    if budget >= group_total:
        if not grouped or value > 1:
            logger.warning("param_budget=%s covers all %d eligible parameters: selecting every tensor",
                           value, group_total)
        return list(members)
    out, used = [], 0
    for e in members:
        if used + e.numel <= budget:
            out.append(e)
            used += e.numel
    return out


def _is_fraction(value: Union[int, float]) -> bool:
    """Whether a ``param_budget`` is a fraction of the eligible parameters (else a count)."""
    return isinstance(value, float) and value <= 1


def _budget(value: Union[int, float], total: int) -> float:
    """The whole budget in parameters: ``b · total`` for a fraction, ``b`` for a count."""
    return value * total if _is_fraction(value) else value


def _fill_round_robin(groups: List[List[KappaEntry]], chosen: List[KappaEntry], budget: float
                      ) -> List[KappaEntry]:
    """Step 2 of a grouped ``param_budget`` (:class:`SelectionPolicy`): fill what ``chosen`` leaves of
    ``budget`` round-robin over ``groups`` (each best first). In each round every group with tensors
    left, ordered by its best remaining tensor (ties by name), drops the ones that no longer fit and
    adds the best one that does; rounds repeat until no group adds one."""
    taken = {e.name for e in chosen}
    used = sum(e.numel for e in chosen)
    out = list(chosen)
    queues = [collections.deque(e for e in members if e.name not in taken) for members in groups]
    while True:
        added = False
        for q in sorted((q for q in queues if q), key=lambda q: _sort_key(q[0])):
            while q and used + q[0].numel > budget:  # the budget only shrinks: it never fits later
                q.popleft()
            if q:
                e = q.popleft()
                out.append(e)
                used += e.numel
                added = True
        if not added:
            return out


class FreezeHandle:
    """Returned by :func:`freeze_all_but`; :meth:`restore` puts every ``requires_grad`` back.

    Also a context manager: ``with freeze_all_but(model, names): ...`` restores on exit.
    """

    def __init__(self, saved: List[Tuple[nn.Parameter, bool]], trainable: List[str]) -> None:
        self._saved = saved
        self.trainable = trainable
        self.restored = False

    def restore(self) -> None:
        for p, flag in self._saved:
            p.requires_grad_(flag)
        self.restored = True

    def __enter__(self) -> "FreezeHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"FreezeHandle({len(self.trainable)} trainable, restored={self.restored})"


def freeze_all_but(model: nn.Module, names: Iterable[str]) -> FreezeHandle:
    """Set ``requires_grad=False`` on every parameter of ``model`` except ``names``.

    Names may be any alias of a tied parameter. Unknown names raise :class:`ValueError` before
    anything is changed.
    """
    wanted = list(dict.fromkeys(names))
    all_named = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in wanted if n not in all_named]
    if missing:
        import difflib

        hint = difflib.get_close_matches(missing[0], list(all_named), n=1)
        raise ValueError(
            f"{len(missing)} name(s) are not parameters of {type(model).__name__}: {missing[:5]}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    keep = {id(all_named[n]) for n in wanted}
    saved: List[Tuple[nn.Parameter, bool]] = []
    seen = set()
    for p in all_named.values():
        if id(p) in seen:
            continue
        seen.add(id(p))
        saved.append((p, p.requires_grad))
        p.requires_grad_(id(p) in keep)
    return FreezeHandle(saved, wanted)
