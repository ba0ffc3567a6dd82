"""The κ table and the selection policies.

A :class:`KappaTable` holds one :class:`KappaEntry` per analysed tensor, ordered lowest κ first
(ties broken by name, ``inf`` last). :meth:`KappaTable.select` turns it into a list of names with
exactly one policy:

* ``num_tensors=k``: the ``k`` lowest-κ tensors;
* ``top_fraction=f``: the lowest-κ ``ceil(f · N)`` of the ``N`` tensors;
* ``param_budget=b``: walking from the lowest κ up, every tensor that still fits in a budget of
  ``b`` parameters (a float ``0 < b <= 1``: a fraction of the eligible parameters; an int: a count);
* ``max_kappa=t``: every tensor with ``κ <= t``.

``group_by="kind"`` (q_proj, up_proj, …) or ``"layer"`` applies the policy within each group, so a
budget is spread over the module kinds (as Spectrum does per layer type) instead of being taken by
the kind whose matrices happen to be best conditioned.

Example::

    >>> names = table.select(param_budget=0.05, group_by="kind")
    >>> handle = kappatune.freeze_all_but(model, names)
    >>> ...  # train
    >>> handle.restore()
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

__all__ = ["KappaEntry", "KappaTable", "SelectionPolicy", "NameFilter", "FreezeHandle", "freeze_all_but",
           "module_kind", "layer_index", "compile_patterns", "kappa_sort_key"]

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
class KappaEntry:
    """κ of one tensor. ``per_matrix`` holds the per-expert values of a stacked 3-D parameter."""

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

    def __float__(self) -> float:
        return float(self.kappa)

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

        return {
            "name": self.name, "kappa": enc(self.kappa), "shape": list(self.shape), "numel": self.numel,
            "dtype": self.dtype, "layout": self.layout, "sigma_max": enc(self.sigma_max),
            "sigma_min": enc(self.sigma_min),
            "per_matrix": None if self.per_matrix is None else [enc(v) for v in self.per_matrix],
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KappaEntry":
        pm = d.get("per_matrix")
        return cls(
            name=str(d["name"]), kappa=float(d["kappa"]), shape=tuple(int(s) for s in d["shape"]),
            numel=int(d["numel"]), dtype=str(d.get("dtype", "")), layout=str(d.get("layout", "matrix")),
            sigma_max=float(d.get("sigma_max", "nan")), sigma_min=float(d.get("sigma_min", "nan")),
            per_matrix=None if pm is None else tuple(float(v) for v in pm), digest=d.get("digest"),
        )


def kappa_sort_key(kappa: float) -> float:
    """The order of κ values in tables and selections: ascending, NaN (unknown) last with ``inf``."""
    return math.inf if math.isnan(kappa) else kappa


def _sort_key(e: KappaEntry) -> Tuple[float, str]:
    return (kappa_sort_key(e.kappa), e.name)


GroupBy = Union[None, str, Callable[[str], Any]]
Patterns = Union[None, str, Sequence[str]]


class KappaTable(Sequence[KappaEntry]):
    """κ of every analysed tensor, lowest κ first (ties by name). Indexable by position or name.

    ``skipped`` maps each parameter that was not analysed to the reason (``"ndim<2"``,
    ``"max_dim"``, ``"excluded"``, ``"not included"``, …).
    """

    def __init__(self, entries: Iterable[KappaEntry], skipped: Optional[Mapping[str, str]] = None) -> None:
        self._entries: List[KappaEntry] = sorted(entries, key=_sort_key)
        self._by_name: Dict[str, KappaEntry] = {}
        for e in self._entries:
            if e.name in self._by_name:
                raise ValueError(f"duplicate tensor name in κ table: {e.name!r}")
            self._by_name[e.name] = e
        self.skipped: Dict[str, str] = dict(skipped or {})

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
        """Names, lowest κ first."""
        return [e.name for e in self._entries]

    @property
    def kappas(self) -> Dict[str, float]:
        return {e.name: e.kappa for e in self._entries}

    @property
    def total_numel(self) -> int:
        return sum(e.numel for e in self._entries)

    def __repr__(self) -> str:
        if not self._entries:
            return f"KappaTable(0 tensors, {len(self.skipped)} skipped)"
        finite = [e.kappa for e in self._entries if math.isfinite(e.kappa)]
        rng = f"κ {finite[0]:.4g} … {finite[-1]:.4g}, median {statistics.median(finite):.4g}" if finite else "κ all inf"
        n_inf = len(self._entries) - len(finite)
        inf = f", {n_inf} rank-deficient" if n_inf else ""
        return (f"KappaTable({len(self)} tensors, {self.total_numel:,} params, {rng}{inf}, "
                f"{len(self.skipped)} skipped)")

    def format(self, top: Optional[int] = None, selected: Iterable[str] = ()) -> str:
        """A plain-text table: rank, name, shape, params, κ, selected."""
        sel = set(selected)
        rows = self._entries if top is None else self._entries[:top]
        w = max([len(e.name) for e in rows] + [4])
        lines = [f"{'rank':>4}  {'name':<{w}}  {'shape':<16}  {'params':>12}  {'kappa':>11}  sel"]
        for i, e in enumerate(rows, 1):
            shape = "x".join(map(str, e.shape))
            lines.append(f"{i:>4}  {e.name:<{w}}  {shape:<16}  {e.numel:>12,}  {e.kappa:>11.5g}  "
                         f"{'*' if e.name in sel else ''}")
        return "\n".join(lines)

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"entries": [e.to_dict() for e in self._entries], "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KappaTable":
        return cls([KappaEntry.from_dict(e) for e in d["entries"]], d.get("skipped") or {})

    def subset(self, names: Iterable[str]) -> "KappaTable":
        """A table of only ``names`` (each must be present)."""
        return KappaTable([self[n] for n in names])

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
        """Names chosen by exactly one policy, lowest κ first (see the module docstring).

        Args:
            policy (Optional[SelectionPolicy]): a prepared policy (default ``None``: built from
                the keyword arguments below, which must then name exactly one policy).
            num_tensors (Optional[int]): the ``k`` lowest-κ tensors (default ``None``; see
                :class:`SelectionPolicy` for every policy).
            top_fraction (Optional[float]): the lowest-κ ``ceil(f · N)`` of the ``N``
                candidates (default ``None``).
            param_budget (Optional[Union[int, float]]): a parameter budget, a fraction
                ``0 < b <= 1`` of the candidates' parameters or a count (default ``None``).
            max_kappa (Optional[float]): every tensor with ``κ <= t`` (default ``None``).
            include (None, str or sequence of str): regexes (``re.search`` on the name) a
                candidate must match (see :class:`NameFilter`; default ``None``).
            exclude (None, str or sequence of str): regexes that leave a candidate out
                (default ``None``).
            group_by (None, str or Callable[[str], Any]): apply the policy per ``"kind"``, per
                ``"layer"`` or per key of a callable (default ``None``).

        Raises:
            ValueError: no policy or several, an invalid value, or nothing selectable.
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

    Args:
        num_tensors (Optional[int]): the ``k`` lowest-κ tensors (default ``None``).
        top_fraction (Optional[float]): the lowest-κ ``ceil(f · N)`` of the ``N`` candidates,
            ``0 < f <= 1`` (default ``None``).
        param_budget (Optional[Union[int, float]]): walking from the lowest κ up, every tensor
            that still fits in ``b`` parameters: a float ``0 < b <= 1`` is a fraction of the
            candidates' parameters, a whole number ``>= 1`` a count (default ``None``).
        max_kappa (Optional[float]): every tensor with ``κ <= t`` (default ``None``).
        group_by (None, ``"kind"``, ``"layer"`` or Callable[[str], Any]): apply the policy within
            each module kind, each layer, or each key of a callable ``name -> key`` (default ``None``:
            over all candidates at once). An absolute ``param_budget`` is split over the groups in
            proportion to their size.

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
        """The names this policy selects from ``table`` (candidates passing ``names``), lowest κ first.

        Raises:
            ValueError: when nothing is selectable, saying why.
        """
        policy, value, group_by = self.name, self.value, self.group_by
        names = names if names is not None else NameFilter()
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
        if not chosen:
            if policy == "max_kappa":
                raise ValueError(f"nothing selectable: no tensor has κ <= {value:g} "
                                 f"(lowest κ is {cands[0].kappa:.4g} for {cands[0].name!r})")
            smallest = min(cands, key=lambda e: e.numel)
            where = (f" within each group of group_by={group_by!r} (the budget is split over the groups; "
                     "raise it or drop group_by)") if group_by is not None else ""
            raise ValueError(f"nothing selectable: param_budget={value!r} is smaller than the smallest "
                             f"eligible tensor{where} (smallest: {smallest.name!r}, {smallest.numel:,} params)")
        chosen.sort(key=_sort_key)
        return [e.name for e in chosen]


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
    if isinstance(value, float) and value <= 1:  # a fraction of the eligible parameters
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
