"""The selection rules: which tensors of a κ table to train, and freezing the rest.

:class:`SelectionPolicy` is the one place where "exactly one policy", each policy's value checks
and its application live; every caller (:meth:`KappaTable.select <kappatune.table.KappaTable.select>`,
:class:`~kappatune.KappaTuneOptimizer`, :func:`~kappatune.resolve_selection`, the Trainer
factory, the PEFT bridge and the command line) goes through :meth:`SelectionPolicy.resolve`, each
naming the arguments in its own spelling. "Best" is the table's order, so the same policy selects
the lowest-κ tensors of a κ table and the highest-SNR tensors of an SNR table:

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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .refs import GroupBy, NameFilter, layer_index, module_kind

__all__ = ["SelectionPolicy", "GroupBy", "FreezeHandle", "freeze_all_but"]

logger = logging.getLogger(__name__)


_POLICY_NAMES = ("num_tensors", "top_fraction", "param_budget", "max_kappa")


def _validate_value(policy: str, value: Any, arg: Optional[str] = None) -> None:
    """``value`` checked for ``policy``; errors name the argument ``arg`` (default: the policy)."""
    arg = arg or policy
    if policy == "num_tensors":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    elif policy == "top_fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{arg} must be in (0, 1], got {value!r}")
    elif policy == "param_budget":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"{arg} must be a float fraction in (0, 1] or an int parameter count >= 1, "
                             f"got {value!r}")
        if isinstance(value, float) and value > 1 and not value.is_integer():
            raise ValueError(f"{arg} > 1 is a parameter count and must be whole, got {value!r}")
    elif policy == "max_kappa":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
            raise ValueError(f"{arg} must be a number > 0, got {value!r}")


def _spelt(spelling: Optional[Mapping[str, str]]) -> Callable[[str], str]:
    """How a caller names each argument: ``spelling[k]``, else ``k=``."""
    spelling = spelling or {}
    return lambda k: spelling.get(k, f"{k}=")


def _exactly_one(given: List[str], spell: Callable[[str], str], alternative: str, default: str,
                 offered: Sequence[str] = _POLICY_NAMES) -> None:
    """The "exactly one policy" rule (at most one where the caller has a ``default``)."""
    if len(given) == 1 or (default and not given):
        return
    options = [spell(k) for k in offered if spell(k) != default] + ([alternative] if alternative else [])
    listed = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
    got = ", ".join(spell(k).rstrip("=") for k in given) if given else "none"
    if default:
        raise ValueError(f"give only one selection policy: at most one of {listed} (else {default}) chooses "
                         f"what to train; got {got}")
    lead = "give a selection policy" if not given else "give only one selection policy"
    raise ValueError(f"{lead}: exactly one selection policy of {listed} chooses what to train; got {got}")


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
        _exactly_one([k for k in _POLICY_NAMES if getattr(self, k) is not None], _spelt(None), "", "")
        _validate_value(self.name, self.value)
        if self.group_by is not None:
            _group_key(self.group_by)

    @classmethod
    def resolve(cls, policy: Optional["SelectionPolicy"] = None, *, names: Optional[Any] = None,
                group_by: GroupBy = None, spelling: Optional[Mapping[str, str]] = None, alternative: str = "",
                default: str = "", required: bool = True, offered: Optional[Sequence[str]] = None,
                **options: Any) -> Optional["SelectionPolicy"]:
        """The one policy of a caller's arguments: ``policy=``, the policy keywords, or ``names=``.

        Every entry point goes through here, so the rule and its messages are the same everywhere;
        ``spelling`` lets each name the arguments as its users write them.

        Args:
            policy (SelectionPolicy, optional): a prepared policy. Default: ``None``.
            names (optional): an explicit list of names given instead of a policy (then ``None`` is
                returned). Default: ``None``.
            group_by (None, str or Callable[[str], Any], optional): as :class:`SelectionPolicy`.
                Default: ``None``.
            spelling (Mapping[str, str], optional): how the caller writes each argument in messages,
                e.g. ``{"num_tensors": "--num-tensors"}`` or PEFT's ``{"num_tensors": "num_modules="}``.
                Default: ``None`` (``num_tensors=``, …).
            alternative (str, optional): another way to choose, named in the message. Default:
                ``""`` (e.g. ``"names= (an explicit list of parameter names)"``).
            default (str, optional): the caller's default when no policy is given (e.g. PEFT's
                ``"top_p="``): the rule becomes "at most one". Default: ``""`` (exactly one).
            required (bool, optional): ``False`` returns ``None`` when nothing is given instead of
                raising. Default: ``True``.
            offered (Sequence[str], optional): the policy keywords the caller takes, listed in the
                message when none or several are given. Default: ``None`` (all four; a caller that
                takes only a prepared ``policy=`` passes ``()`` and names it in ``alternative``).
            **options: ``num_tensors``, ``top_fraction``, ``param_budget``, ``max_kappa``;
                ``None`` values count as not given.

        Returns:
            Optional[SelectionPolicy]: the policy; ``None`` with ``names=``, when nothing is given
                and not ``required``, or when ``default`` applies.

        Raises:
            TypeError: an unknown option, or ``policy`` that is not a :class:`SelectionPolicy`.
            ValueError: no policy or several, policy and keywords both, a policy with ``names=``,
                an invalid value (named in the caller's spelling).
        """
        spell = _spelt(spelling)
        unknown = sorted(set(options) - set(_POLICY_NAMES))
        if unknown:
            raise TypeError(f"unknown selection option(s): {', '.join(unknown)}")
        given = [k for k in _POLICY_NAMES if options.get(k) is not None]
        if policy is not None and not isinstance(policy, SelectionPolicy):
            raise TypeError(f"policy must be a SelectionPolicy, got {type(policy).__name__}")
        if names is not None:
            if given or policy is not None:
                raise ValueError("names= is an explicit selection: do not combine it with a selection policy "
                                 f"(got {', '.join(spell(k).rstrip('=') for k in given) or policy.name})")
            if group_by is not None:
                raise ValueError("group_by applies to a selection policy, not to an explicit names= list")
            return None
        if policy is not None:
            if given or group_by is not None:
                raise ValueError("give policy= or the policy keywords, not both (got policy= and "
                                 f"{', '.join(spell(k).rstrip('=') for k in given) or 'group_by='})")
            return policy
        if not given and (default or not required):
            return None
        _exactly_one(given, spell, alternative, default, _POLICY_NAMES if offered is None else tuple(offered))
        (name,) = given
        _validate_value(name, options[name], spell(name).rstrip("="))
        return cls(**{name: options[name]}, group_by=group_by)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Optional["SelectionPolicy"]:
        """The policy named in a mapping of options (other keys ignored), or ``None`` if it names none.

        Args:
            options (Mapping[str, Any]): e.g. ``vars(args)`` or a saved selection's record.
        """
        return cls.resolve(group_by=options.get("group_by"), required=False,
                           **{k: options.get(k) for k in _POLICY_NAMES})

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

    def apply(self, table: Sequence[Any], names: Optional[NameFilter] = None, *, allow_empty: bool = False
              ) -> List[str]:
        """The names this policy selects from ``table`` (candidates passing ``names``), best first.

        Args:
            table (KappaTable): the candidates, in the order of their score
                (:class:`kappatune.table.KappaTable`).
            names (NameFilter, optional): include/exclude patterns. Default: ``None`` (every name).
            allow_empty (bool, optional): return ``[]`` instead of raising when nothing is
                selectable (PEFT's ``threshold`` may select no target). Default: ``False``.

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
        if not cands and allow_empty:
            return []
        if not cands:
            raise ValueError(
                f"nothing selectable: none of the {len(table)} tensors in the κ table passes "
                f"include={names.include!r} / exclude={names.exclude!r}"
                + ("" if len(table) else "; the scan analysed no tensor (check the scan filters, e.g. max_dim)")
            )
        if group_by is None:
            groups: Dict[Any, List[Any]] = {None: cands}
        else:
            keyf = _group_key(group_by)
            groups = {}
            for e in cands:
                groups.setdefault(keyf(e.name), []).append(e)
        total = sum(e.numel for e in cands)
        chosen: List[Any] = []
        for members in groups.values():
            chosen.extend(_apply(policy, value, members, total, grouped=group_by is not None))
        if policy == "param_budget" and group_by is not None:
            chosen = _fill_round_robin(list(groups.values()), chosen, _budget(value, total), table.score.key)
        if not chosen and allow_empty:
            return []
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


def _apply(policy: str, value: Any, members: List[Any], total: int, grouped: bool) -> List[Any]:
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


def _fill_round_robin(groups: List[List[Any]], chosen: List[Any], budget: float,
                      score_key: Callable[[float], float]) -> List[Any]:
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
        for q in sorted((q for q in queues if q), key=lambda q: (score_key(q[0].value), q[0].name)):
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

    Args:
        saved (List[Tuple[nn.Parameter, bool]]): each distinct parameter of the model with its
            ``requires_grad`` before the freeze, the flags :meth:`restore` puts back.
        trainable (List[str]): the names left trainable, in the order given (kept as
            ``self.trainable``).
    """

    def __init__(self, saved: List[Tuple[nn.Parameter, bool]], trainable: List[str]) -> None:
        self._saved = saved
        self.trainable = trainable
        self.restored = False

    def restore(self) -> None:
        """Put back every parameter's ``requires_grad`` as it was before the freeze (idempotent)."""
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

    Args:
        model (nn.Module): the model whose parameters are frozen in place.
        names (Iterable[str]): the parameter names (as in ``model.named_parameters()``) left
            trainable; repeats are ignored.

    Returns:
        FreezeHandle: restores every ``requires_grad`` flag as it was, by
            :meth:`FreezeHandle.restore` or on leaving a ``with`` block.

    Raises:
        ValueError: a name that is not a parameter of ``model`` (the closest match suggested).
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
