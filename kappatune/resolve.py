"""What to train: a pure function from a model (or a κ table) and a policy to a :class:`Selection`.

:func:`resolve_selection` is the one place where "which tensors" is decided, for the
:class:`~kappatune.optimizer.KappaTuneOptimizer`, the Hugging Face ``Trainer`` factory and the
command line. It scans (through the cache) or takes a given table, applies the
:class:`~kappatune.selection.SelectionPolicy` and the :class:`~kappatune.refs.NameFilter`, or
resolves an explicit list of names, and changes nothing: freezing and building an optimizer are the
caller's business.

Example::

    >>> sel = resolve_selection(model, SelectionPolicy(param_budget=0.05), max_dim=16384)
    >>> sel.names[:3], sel.kappas[sel.names[0]]
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from torch import nn

from .refs import DEFAULT_MAX_DIM, Eligibility, NameFilter, Patterns, clean_name, dtype_name
from .pipeline import CacheArg, aggregate_kappa, lookup, model_refs, resolve_cache, scan
from .selection import SelectionPolicy
from .table import SCORES, KappaEntry, KappaTable

__all__ = ["Selection", "resolve_selection"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The tensors chosen to train.

    Attributes:
        names (List[str]): parameter names, lowest κ first (ties keep the given order).
        kappas (Dict[str, float]): κ of each name (NaN where unknown, e.g. an explicit name
            that is in neither the table nor the cache).
        table (KappaTable): the table behind the choice (the whole scan, or the entries of the
            explicit names).
        policy (Optional[SelectionPolicy]): the policy applied (``None`` for explicit names).
            Default: ``None``.
        skipped (Dict[str, str]): each parameter that was not a candidate and why (``"ndim<2"``,
            ``"max_dim"``, ``"excluded"``, …), as :attr:`KappaTable.skipped`. Default: ``{}``.
    """

    names: List[str]
    kappas: Dict[str, float]
    table: KappaTable
    policy: Optional[SelectionPolicy] = None
    skipped: Dict[str, str] = field(default_factory=dict)


def named_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    """Every name of every parameter of ``module`` (tied aliases too, and each name without the
    components wrappers insert, see :func:`kappatune.refs.clean_name`) → the parameter."""
    out: Dict[str, nn.Parameter] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        out.setdefault(n, p)
        out.setdefault(clean_name(n), p)
    return out


def _check_table(table: KappaTable, module: nn.Module, *, min_ndim: int, max_dim: Optional[int],
                 compare_shapes: bool) -> KappaTable:
    """``table`` restricted by the scan filters, after checking it describes ``module``."""
    from .quant import is_quantized_param

    by_name = named_parameters(module)
    unknown = [e.name for e in table if e.name not in by_name]
    if unknown:
        raise ValueError(f"table= holds {len(unknown)} tensor(s) that are not parameters of "
                         f"{type(module).__name__}, e.g. {unknown[:3]}; it was computed for another model "
                         "(scan this model, or pass names=)")
    wrong = [(e.name, e.shape, tuple(by_name[e.name].shape)) for e in table
             if compare_shapes and tuple(e.shape) != tuple(by_name[e.name].shape)
             and not is_quantized_param(by_name[e.name])]
    if wrong:
        n, ts, ms = wrong[0]
        raise ValueError(f"table= does not match the model: {n!r} has shape {ts} in the table but {ms} in "
                         f"{type(module).__name__} ({len(wrong)} mismatch(es)); scan this model")
    keep, skipped = [], dict(table.skipped)
    eligible = Eligibility(min_ndim, max_dim)
    for e in table:
        reason = eligible.reason(e.name, e.shape, e.layout)
        if reason:
            skipped[e.name] = reason
        else:
            keep.append(e)
    return table if len(keep) == len(table) else KappaTable(keep, skipped)


def _explicit(module: nn.Module, names: Sequence[str], table: Optional[KappaTable], cache: CacheArg,
              aggregate: str) -> Selection:
    try:  # any iterable of names, read once (a generator would be used up by a first look)
        names = list(names) if not isinstance(names, (str, bytes)) else None  # type: ignore[assignment]
    except TypeError:
        names = None  # type: ignore[assignment]
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError("names must be a list (or any iterable) of parameter names (strings)")
    if not names:
        raise ValueError("names= is empty: give at least one parameter name to train")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"names= lists {dup[:3]} more than once")
    by_name = named_parameters(module)
    missing = [n for n in names if n not in by_name]
    if missing:
        hint = difflib.get_close_matches(missing[0], list(by_name), n=1)
        raise ValueError(f"{len(missing)} name(s) in names= are not parameters of "
                         f"{type(module).__name__}: {missing[:5]}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    seen: Dict[int, str] = {}
    for n in names:
        other = seen.setdefault(id(by_name[n]), n)
        if other != n:
            raise ValueError(f"names= lists the tied parameter twice, as {other!r} and {n!r}")
    if table is not None:
        kappa = {n: table[n].kappa for n in names if n in table}
    else:
        kappa = _cached_kappas(module, names, cache, aggregate)
    entries = []
    for n in names:
        p = by_name[n]
        base = table[n] if table is not None and n in table else None
        entries.append(base or KappaEntry(name=n, kappa=kappa.get(n, math.nan), shape=tuple(p.shape),
                                          numel=p.numel(), dtype=dtype_name(p.dtype)))
    order = sorted(range(len(names)), key=lambda i: (SCORES["kappa"].key(kappa.get(names[i], math.nan)), i))
    selected = [names[i] for i in order]
    return Selection(selected, {n: float(kappa.get(n, math.nan)) for n in selected},
                     table if table is not None else KappaTable(entries))


def _tied_filter(module: nn.Module, include: Patterns, exclude: Patterns) -> NameFilter:
    """The include/exclude filter, deciding each tied tensor once, over all its names.

    A tensor with several names (tied weights, e.g. ``lm_head.weight`` and
    ``model.embed_tokens.weight``) is trained or frozen as one object: it is a candidate when one of
    its names is included and none is excluded. The scan and the table know it by its first name;
    where another name decides, an exact pattern for the first name is added, with a warning naming
    the names that share the tensor.
    """
    filt = NameFilter(include, exclude)  # reads a generator once
    include, exclude = filt.include, filt.exclude
    if not filt.active:
        return filt
    groups: Dict[int, List[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names = groups.setdefault(id(p), [])
        if n not in names:
            names.append(n)
    add_inc: List[str] = []
    add_exc: List[str] = []
    for names in groups.values():
        if len(names) < 2:
            continue
        reasons = {n: filt.reason(n) for n in names}
        if len(set(reasons.values())) == 1:
            continue  # every name decides alike
        first, shared = names[0], " = ".join(names)
        if "excluded" in reasons.values():
            by = [n for n in names if reasons[n] == "excluded"]
            logger.warning("%s are one tensor (tied weights); exclude= matches %s, so it is frozen under every "
                           "name: a tied tensor is trained or frozen as one", shared, ", ".join(by))
            if reasons[first] != "excluded":
                add_exc.append(f"^{re.escape(first)}$")
        else:
            by = [n for n in names if reasons[n] is None]
            logger.warning("%s are one tensor (tied weights); include= matches %s, so it is a candidate, once, "
                           "as %s", shared, ", ".join(by), first)
            if reasons[first] is not None:
                add_inc.append(f"^{re.escape(first)}$")
    if not add_inc and not add_exc:
        return filt

    def extend(patterns: Patterns, extra: List[str]) -> Patterns:
        if not extra:
            return patterns
        return [*([patterns] if isinstance(patterns, str) else (patterns or [])), *extra]

    return NameFilter(extend(include, add_inc), extend(exclude, add_exc))


def _cached_kappas(module: nn.Module, names: Sequence[str], cache: CacheArg, aggregate: str) -> Dict[str, float]:
    """κ of ``names`` found in the cache (no computation; missing ones are left out)."""
    store = resolve_cache(cache)
    if store is None:
        return {}
    wanted = set(names)
    refs = [r for r in model_refs(module)
            if clean_name(r.name) in wanted and len(r.shape) >= 2 and r.floating]
    out: Dict[str, float] = {}
    for ref in refs:
        try:
            (hit,) = list(lookup([ref], store))
        except (ValueError, RuntimeError, OSError) as e:  # e.g. a meta tensor: no κ, not an error here
            logger.debug("no cached κ for %s: %s", ref.name, e)
            continue
        if hit.cached is not None:
            out[clean_name(ref.name)] = aggregate_kappa(hit.cached, aggregate)
    return out


def resolve_selection(
    model: Optional[nn.Module],
    policy: Optional[SelectionPolicy] = None,
    *,
    names: Optional[Iterable[str]] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    table: Optional[KappaTable] = None,
    min_ndim: int = 2,
    max_dim: Optional[int] = DEFAULT_MAX_DIM,
    aggregate: str = "mean",
    cache: CacheArg = True,
    recompute: bool = False,
    progress: Optional[bool] = None,
    compare_shapes: bool = True,
) -> Selection:
    """Which tensors to train, without changing anything.

    Exactly one of ``policy`` and ``names`` is given. With a policy, the candidates are the
    tensors of ``table`` (checked against ``model`` and restricted by ``min_ndim``/``max_dim``) or,
    without a table, of a :func:`~kappatune.pipeline.scan` of ``model``; ``include``/``exclude``
    restrict them in both cases. A tied tensor (one tensor, several names) is filtered as one
    object: it is a candidate when one of its names is included and none is excluded, and a
    warning names the names it shares.

    Args:
        model (Optional[nn.Module]): the (unwrapped) model; may be ``None`` only with ``table``
            and a policy (the command line, which has a checkpoint's table and no model).
        policy (Optional[SelectionPolicy]): the κ policy (default ``None``).
        names (Optional[Iterable[str]]): an explicit list (or any iterable) of parameter names
            instead (default ``None``); κ is taken from ``table`` or, without one, from the cache
            (no computation).
        include (None, str or sequence of str): regexes (``re.search`` on the name) a candidate
            must match (default ``None``).
        exclude (None, str or sequence of str): regexes that leave a candidate out (default
            ``None``).
        table (Optional[KappaTable]): a precomputed table of this model (default ``None``: scan).
        min_ndim (int): skip tensors with fewer dimensions (default ``2``), as :func:`kappatune.scan`.
        max_dim (Optional[int]): skip tensors with a longer matrix side; ``None``: no limit (default
            :data:`~kappatune.refs.DEFAULT_MAX_DIM`, 16384).
        aggregate (str): ``"mean"`` or ``"max"`` over a stacked 3-D parameter (default ``"mean"``).
        cache (bool, None, str, PathLike or KappaCache): the κ cache, as :func:`kappatune.scan`
            (default ``True``: the default cache).
        recompute (bool): ignore cached κ values (default ``False``).
        progress (Optional[bool]): a progress bar while scanning (default ``None``: only on a
            terminal).
        compare_shapes (bool): check the table's shapes against the model's (default ``True``;
            ``False`` where each rank holds flat shards, as FSDP1 does).

    Raises:
        ValueError: neither or both of ``policy`` and ``names``, a table of another model, names
            that are not parameters, or nothing selectable.
    """
    if table is not None and not isinstance(table, KappaTable):
        raise TypeError(f"table must be a KappaTable (from kappatune.scan), got {type(table).__name__}")
    policy = SelectionPolicy.resolve(policy, names=names, offered=(),
                                     alternative="policy= (a SelectionPolicy) or names= (parameter names)")
    if names is not None:
        if model is None:
            raise ValueError("names= needs the model, to check the names")
        return _explicit(model, names, table, cache, aggregate)
    filt = NameFilter(include, exclude) if model is None else _tied_filter(model, include, exclude)
    if table is None:
        if model is None:
            raise ValueError("resolve_selection needs a model to scan, or table=")
        table = scan(model, min_ndim=min_ndim, max_dim=max_dim, include=filt.include, exclude=filt.exclude,
                     cache=cache, recompute=recompute, aggregate=aggregate, progress=progress)
    elif model is not None:
        table = _check_table(table, model, min_ndim=min_ndim, max_dim=max_dim, compare_shapes=compare_shapes)
    chosen = policy.apply(table, filt)
    return Selection(chosen, {n: table[n].kappa for n in chosen}, table, policy, dict(table.skipped))
