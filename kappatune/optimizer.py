"""KappaTuneOptimizer: train only the lowest-κ tensors of a model, with any torch optimizer.

:class:`KappaTuneOptimizer` scans the model (through the :class:`~kappatune.cache.KappaCache`),
selects tensors with one policy of :meth:`~kappatune.selection.KappaTable.select`, sets
``requires_grad=False`` on every other parameter and builds the inner optimizer over the selected
tensors only. The inner optimizer never sees a frozen tensor, so neither its update nor its
weight decay can touch one, and its state (e.g. AdamW's two moments) is allocated for the
selected tensors alone: for AdamW, optimizer memory is ``2 · 4 · Σ_selected numel`` bytes instead
of ``2 · 4 · Σ_all numel``.

It **is** a :class:`torch.optim.Optimizer`: ``param_groups``, ``state`` and ``defaults`` are the
inner optimizer's own objects (``opt.param_groups is opt.inner.param_groups``), so learning-rate
schedulers, ``torch.amp.GradScaler``, gradient clipping, accelerate and the Hugging Face
``Trainer`` act on the real optimizer. ``state_dict()`` adds the selection (names, shapes, κ)
to the inner optimizer's state dict; ``load_state_dict()`` restores that selection, so a resumed
run trains exactly the same tensors even if the κ cache is gone or the weights (and hence κ)
changed during training.

Example::

    >>> import torch, kappatune
    >>> opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, top_fraction=0.1,
    ...                                    lr=2e-5, weight_decay=0.01)
    >>> print(opt.summary())
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    >>> for batch in data:
    ...     model(**batch).loss.backward()
    ...     opt.step(); sched.step(); opt.zero_grad()
    >>> torch.save(opt.state_dict(), "opt.pt")   # carries the selection
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .cache import KappaCache, tensor_digest
from .distributed import check_ddp_selection, check_same_selection, check_wrapped_model, sharding_kind
from .selection import FreezeHandle, KappaEntry, KappaTable, freeze_all_but

__all__ = ["KappaTuneOptimizer", "SelectiveFineTuningOptimizer", "unwrap_model", "STATE_KEY"]

logger = logging.getLogger(__name__)

#: Key of the selection record that :meth:`KappaTuneOptimizer.state_dict` adds to the inner
#: optimizer's state dict.
STATE_KEY = "kappatune"
_STATE_FORMAT = "kappatune-selection"
_STATE_VERSION = 1
_POLICIES = ("num_tensors", "top_fraction", "param_budget", "max_kappa")
# Components that wrappers insert into parameter names (FSDP1, activation checkpointing, compile).
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_MISSING = object()

OptimizerFactory = Callable[..., torch.optim.Optimizer]
Patterns = Union[None, str, Sequence[str]]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Parameter names of a :class:`KappaTuneOptimizer` are those of the unwrapped module.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
    return model


def _clean_name(name: str) -> str:
    """``_fsdp_wrapped_module.model.layers.0.…`` → ``model.layers.0.…`` (wrapper components removed)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts)


def _named_params(module: nn.Module) -> Dict[str, nn.Parameter]:
    """Every name (tied aliases too, wrapper components removed) → parameter."""
    out: Dict[str, nn.Parameter] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        out.setdefault(n, p)
        out.setdefault(_clean_name(n), p)
    return out


def _param_names_by_id(module: nn.Module) -> Dict[int, str]:
    """id(parameter) → its first (cleaned) name."""
    out: Dict[int, str] = {}
    for n, p in module.named_parameters():
        out.setdefault(id(p), _clean_name(n))
    return out


def _freeze_all_but(module: nn.Module, params: Sequence[torch.Tensor]) -> FreezeHandle:
    """:func:`freeze_all_but` by parameter objects (their names in ``module`` may carry wrapper parts)."""
    raw = {}
    for n, p in module.named_parameters():
        raw.setdefault(id(p), n)
    return freeze_all_but(module, [raw[id(p)] for p in params])


def _is_quantized(p: torch.Tensor) -> bool:
    from .quant import is_quantized_param

    return is_quantized_param(p)


def _refuse_quantized(name: str, p: torch.Tensor) -> None:
    if _is_quantized(p):
        raise ValueError(
            f"{name!r} is a bitsandbytes-quantized weight ({type(p).__name__}) and cannot be trained by a torch "
            "optimizer; exclude it (exclude=[...]) or fine-tune the quantized model through adapters with "
            "kappatune.integrations.peft"
        )


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _kappa_sort_key(kappa: float) -> float:
    return math.inf if math.isnan(kappa) else kappa


class KappaTuneOptimizer(torch.optim.Optimizer):
    r"""Train only the lowest-κ tensors of ``model`` with any torch optimizer.

    The condition number of a weight :math:`W` is :math:`\kappa(W) = \sigma_{\max}(W) /
    \sigma_{\min}(W)`; tensors with low κ are the least specialised and the safest to update
    (arXiv 2506.16289). This optimizer scans ``model``, keeps the tensors chosen by one
    selection policy trainable, freezes all the rest and delegates every step to the inner
    optimizer built over the selected tensors.

    Args:
        model: the model to fine-tune (a ``DistributedDataParallel``/``DataParallel``/
            ``torch.compile`` wrapper is unwrapped; names are those of the inner module).
        optimizer: a ``torch.optim.Optimizer`` subclass or any callable ``params -> Optimizer``
            (``functools.partial(torch.optim.SGD, momentum=0.9)``, a third-party optimizer
            class). It is called as ``optimizer(selected_params, **optimizer_kwargs)``.
        num_tensors / top_fraction / param_budget / max_kappa: the selection policy; give exactly
            one of them, or ``names`` (see :meth:`KappaTable.select`).
        names: an explicit list of parameter names to train (no scan is needed; κ is recorded
            from ``table`` or from the cache when available, else NaN).
        group_by: apply the policy per ``"kind"`` (q_proj, up_proj, …), per ``"layer"``, or per
            key of a callable ``name -> key``.
        min_ndim, max_dim, include, exclude, aggregate: scan filters (see :func:`kappatune.scan`);
            ``include``/``exclude`` also restrict the candidates of a given ``table``.
        table: a precomputed :class:`KappaTable` of this model (skips the scan).
        cache_dir: ``True`` → the default κ cache; ``None``/``False`` → no cache; a path or a
            :class:`KappaCache`.
        recompute: ignore cached κ values (fresh values are still written to the cache).
        progress: show a progress bar while scanning.
        **optimizer_kwargs: passed to ``optimizer`` (``lr``, ``weight_decay``, …). Invalid
            values fail here, with the inner optimizer's own message.

    Attributes:
        inner: the wrapped optimizer. ``param_groups``, ``state`` and ``defaults`` are its own.
        model: the model given.
        selected: names of the trained tensors, lowest κ first.
        kappas: the :class:`KappaTable` behind the choice (the whole scan).

    Example::

        >>> opt = KappaTuneOptimizer(model, torch.optim.AdamW, param_budget=0.05, lr=2e-5)
        >>> opt.param_groups is opt.inner.param_groups
        True
    """

    _PICKLED = ("inner", "model", "_module", "_table", "_selected", "_kappa", "_freeze", "_zero_grad_arg")

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory = torch.optim.AdamW,
        *,
        num_tensors: Optional[int] = None,
        top_fraction: Optional[float] = None,
        param_budget: Optional[Union[int, float]] = None,
        max_kappa: Optional[float] = None,
        names: Optional[Sequence[str]] = None,
        group_by: Union[None, str, Callable[[str], Any]] = None,
        min_ndim: int = 2,
        max_dim: Optional[int] = None,
        include: Patterns = None,
        exclude: Patterns = None,
        aggregate: str = "mean",
        table: Optional[KappaTable] = None,
        cache_dir: Union[bool, None, str, "KappaCache", Any] = True,
        recompute: bool = False,
        progress: bool = True,
        **optimizer_kwargs: Any,
    ) -> None:
        self._init_hooks()
        if not isinstance(model, nn.Module):
            hint = ""
            if isinstance(model, (list, tuple)) or inspect.isgenerator(model):
                hint = (" It got parameters or parameter groups, which is what transformers' Trainer passes "
                        "through optimizer_cls_and_kwargs when the kwargs carry no 'model': use "
                        "optimizer_cls_and_kwargs=(KappaTuneOptimizer, {'model': model, ...}) or "
                        "kappatune.integrations.transformers.optimizer_cls_and_kwargs(model, ...).")
            raise TypeError(f"KappaTuneOptimizer needs the model (an nn.Module) to scan and name its tensors, got "
                            f"{type(model).__name__}.{hint}")
        if isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be an optimizer class or a factory params -> Optimizer, got an instance "
                            f"of {type(optimizer).__name__} (it already holds its parameters); pass "
                            f"{type(optimizer).__name__} and its keyword arguments instead")
        if not callable(optimizer):
            raise TypeError(f"optimizer must be an optimizer class or a callable params -> Optimizer, "
                            f"got {type(optimizer).__name__}")
        if table is not None and not isinstance(table, KappaTable):
            raise TypeError(f"table must be a KappaTable (from kappatune.scan), got {type(table).__name__}")
        policies = dict(num_tensors=num_tensors, top_fraction=top_fraction, param_budget=param_budget,
                        max_kappa=max_kappa)
        given = sorted(k for k, v in policies.items() if v is not None)
        if names is not None:
            if given:
                raise ValueError(f"names= is an explicit selection: do not combine it with a selection policy "
                                 f"(got {', '.join(given)})")
            if group_by is not None:
                raise ValueError("group_by applies to a selection policy, not to an explicit names= list")
        elif len(given) != 1:
            raise ValueError("choose what to train with exactly one of num_tensors=, top_fraction=, param_budget=, "
                             "max_kappa= (a κ selection policy) or names= (an explicit list of parameter names); "
                             + (f"got {', '.join(given)}" if given else "got none"))

        if names is None:
            from .selection import _validate_policy

            _validate_policy(given[0], policies[given[0]])  # before a scan, not after
        self.model = model
        self._module = unwrap_model(model)
        check_wrapped_model(model, scanning=names is None and table is None)
        if names is not None:
            selected, kappa, self._table = self._resolve_names(names, table, cache_dir, aggregate)
        else:
            if table is None:
                from .scan import scan

                table = scan(self._module, min_ndim=min_ndim, max_dim=max_dim, include=include, exclude=exclude,
                             cache=cache_dir, recompute=recompute, aggregate=aggregate, progress=progress)
            else:
                table = self._check_table(table, min_ndim, max_dim)
            self._table = table
            selected = table.select(include=include, exclude=exclude, group_by=group_by,
                                    **{k: v for k, v in policies.items() if v is not None})
            kappa = {n: table[n].kappa for n in selected}

        by_name = _named_params(self._module)
        params = [by_name[n] for n in selected]
        for n, p in zip(selected, params):
            _refuse_quantized(n, p)
            if not p.is_floating_point() and not p.is_complex():
                raise ValueError(f"{n!r} has dtype {p.dtype}; only floating-point tensors can be trained")

        check_same_selection(selected)
        check_ddp_selection(model, params)
        self._freeze: FreezeHandle = _freeze_all_but(self._module, params)
        try:
            inner = optimizer(params, **optimizer_kwargs)
            if not isinstance(inner, torch.optim.Optimizer):
                raise TypeError(f"optimizer={getattr(optimizer, '__name__', optimizer)!r} returned "
                                f"{type(inner).__name__}, not a torch.optim.Optimizer")
            held = [p for g in inner.param_groups for p in g["params"]]
            if {id(p) for p in held} != {id(p) for p in params} or len(held) != len(params):
                raise ValueError(f"the optimizer built by {getattr(optimizer, '__name__', optimizer)!r} does not "
                                 f"hold exactly the {len(params)} selected tensors it was given "
                                 f"(it holds {len(held)}); pass a factory that optimizes the params it receives")
        except BaseException:
            self._freeze.restore()
            raise
        self.inner: torch.optim.Optimizer = inner
        names_by_id = {id(p): n for n, p in zip(selected, params)}
        self._selected: List[str] = [names_by_id[id(p)] for g in inner.param_groups for p in g["params"]]
        self._kappa: Dict[str, float] = {n: float(kappa.get(n, math.nan)) for n in self._selected}
        self._zero_grad_arg = "set_to_none" in inspect.signature(inner.zero_grad).parameters
        logger.info("%s", self.summary())

    # -- construction helpers ------------------------------------------------------------
    def _init_hooks(self) -> None:
        from collections import OrderedDict

        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    def _check_table(self, table: KappaTable, min_ndim: int, max_dim: Optional[int]) -> KappaTable:
        by_name = _named_params(self._module)
        unknown = [e.name for e in table if e.name not in by_name]
        if unknown:
            raise ValueError(f"table= holds {len(unknown)} tensor(s) that are not parameters of "
                             f"{type(self._module).__name__}, e.g. {unknown[:3]}; it was computed for another model "
                             "(scan this model, or pass names=)")
        # FSDP1 (use_orig_params=True) leaves each rank a flat 1-D shard view of every parameter:
        # shapes cannot be compared there; the names were checked above.
        sharded = sharding_kind(self.model) == "fsdp1"
        wrong = [(e.name, e.shape, tuple(by_name[e.name].shape)) for e in table
                 if not sharded and tuple(e.shape) != tuple(by_name[e.name].shape)
                 and not _is_quantized(by_name[e.name])]
        if wrong:
            n, ts, ms = wrong[0]
            raise ValueError(f"table= does not match the model: {n!r} has shape {ts} in the table but {ms} in "
                             f"{type(self._module).__name__} ({len(wrong)} mismatch(es)); scan this model")
        from .scan import _matrix_dims

        keep, skipped = [], dict(table.skipped)
        for e in table:
            if len(e.shape) < max(min_ndim, 2):
                skipped[e.name] = f"ndim<{max(min_ndim, 2)}"
            elif max_dim is not None and max(_matrix_dims(tuple(e.shape), e.layout)) > max_dim:
                skipped[e.name] = "max_dim"
            else:
                keep.append(e)
        return table if len(keep) == len(table) else KappaTable(keep, skipped)

    def _resolve_names(self, names: Sequence[str], table: Optional[KappaTable], cache_dir: Any,
                       aggregate: str) -> Tuple[List[str], Dict[str, float], KappaTable]:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError("names must be a list of parameter names (strings)")
        names = list(names)
        if not names:
            raise ValueError("names= is empty: give at least one parameter name to train")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"names= lists {dup[:3]} more than once")
        by_name = _named_params(self._module)
        missing = [n for n in names if n not in by_name]
        if missing:
            import difflib

            hint = difflib.get_close_matches(missing[0], list(by_name), n=1)
            raise ValueError(f"{len(missing)} name(s) in names= are not parameters of "
                             f"{type(self._module).__name__}: {missing[:5]}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        seen: Dict[int, str] = {}
        for n in names:
            other = seen.setdefault(id(by_name[n]), n)
            if other != n:
                raise ValueError(f"names= lists the tied parameter twice, as {other!r} and {n!r}")
        kappa: Dict[str, float] = {}
        if table is not None:
            kappa = {n: table[n].kappa for n in names if n in table}
        else:
            kappa = self._kappas_from_cache(names, cache_dir, aggregate)
        entries = []
        for n in names:
            p = by_name[n]
            base = table[n] if table is not None and n in table else None
            entries.append(base or KappaEntry(name=n, kappa=kappa.get(n, math.nan), shape=tuple(p.shape),
                                              numel=p.numel(), dtype=str(p.dtype).replace("torch.", "")))
        order = sorted(range(len(names)), key=lambda i: (_kappa_sort_key(kappa.get(names[i], math.nan)), i))
        selected = [names[i] for i in order]
        return selected, kappa, (table if table is not None else KappaTable(entries))

    def _kappas_from_cache(self, names: Sequence[str], cache_dir: Any, aggregate: str) -> Dict[str, float]:
        """κ of ``names`` found in the cache (no computation); missing ones are left out."""
        from .scan import _aggregate, _layout_of, _result_from_cache, model_refs, resolve_cache

        store = resolve_cache(cache_dir)
        if store is None:
            return {}
        wanted = set(names)
        out: Dict[str, float] = {}
        for ref in model_refs(self._module):
            name = _clean_name(ref.name)
            if name not in wanted or len(ref.shape) < 2 or not ref.floating:
                continue
            try:
                digest = ref.digest() if ref.digest is not None else tensor_digest(ref.load())
                hit = store.get(KappaCache.key(digest, _layout_of(ref)))
            except (ValueError, RuntimeError, OSError) as e:  # e.g. a meta tensor: no κ, not an error here
                logger.debug("no cached κ for %s: %s", name, e)
                continue
            if hit is not None:
                out[name] = _aggregate(_result_from_cache(hit), aggregate)
        return out

    # -- shared state (the inner optimizer's own objects) -----------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.inner.defaults = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Mirrors the inner optimizer (fused Adam/AdamW/SGD): GradScaler then hands the scale over."""
        return bool(getattr(self.inner, "_step_supports_amp_scaling", False))

    # -- the selection -------------------------------------------------------------------
    @property
    def selected(self) -> List[str]:
        """Names of the trained tensors (the κ selection lowest κ first, then added groups)."""
        return list(self._selected)

    @property
    def kappas(self) -> KappaTable:
        """The :class:`KappaTable` behind the selection (the whole scan)."""
        return self._table

    def _counts(self) -> Tuple[int, int, int, int]:
        total_numel, total_tensors = 0, 0
        for p in self._module.parameters():
            total_numel += p.numel()
            total_tensors += 1
        trained = sum(p.numel() for g in self.inner.param_groups for p in g["params"])
        return trained, total_numel, len(self._selected), total_tensors

    def summary(self) -> str:
        """One line: trained tensors and parameters versus the whole model."""
        trained, total, n_sel, n_all = self._counts()
        frac = 100.0 * trained / total if total else 0.0
        ks = [k for k in (self._kappa.get(n, math.nan) for n in self._selected) if not math.isnan(k)]
        about = [f"κ {min(ks):.4g} … {max(ks):.4g}"] if ks else []
        if len(self._table) > n_sel:
            about.insert(0, f"{len(self._table)} in the κ table")
        about_s = f" ({', '.join(about)})" if about else ""
        return (f"KappaTuneOptimizer({type(self.inner).__name__}): training {n_sel} of {n_all} tensors{about_s}, "
                f"{trained:,} of {total:,} parameters ({frac:.2f}%); all others frozen")

    def __repr__(self) -> str:
        trained, total, n_sel, n_all = self._counts()
        inner = repr(self.inner).replace("\n", "\n    ")
        return (f"KappaTuneOptimizer({n_sel}/{n_all} tensors, {_fmt_count(trained)}/{_fmt_count(total)} params "
                f"trainable) wrapping\n    {inner}")

    # -- optimizer protocol --------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """One step of the inner optimizer; returns what it returns (the closure's loss).

        Step pre/post hooks registered on this object fire around it; hooks registered on the
        inner optimizer and global optimizer hooks fire once, inside the inner step. Under
        ``torch.amp.GradScaler`` with an optimizer that unscales itself (``fused=True``), the
        ``grad_scale``/``found_inf`` the scaler sets here are handed to the inner optimizer.
        """
        args: Tuple[Any, ...] = (self,) if closure is None else (self, closure)
        for hook in list(self._optimizer_step_pre_hooks.values()):
            res = hook(self, args, kwargs)
            if res is not None:
                if not (isinstance(res, tuple) and len(res) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {res!r}")
                args, kwargs = res
        inner = self.inner
        handed = {a: self.__dict__[a] for a in ("grad_scale", "found_inf") if a in self.__dict__}
        previous = {a: inner.__dict__.get(a, _MISSING) for a in handed}
        for a, v in handed.items():
            setattr(inner, a, v)
        try:
            out = inner.step(*args[1:], **kwargs)
        finally:
            for a, v in previous.items():
                if v is _MISSING:
                    inner.__dict__.pop(a, None)
                else:
                    setattr(inner, a, v)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, args, kwargs)
        return out

    # Never let torch.optim.Optimizer._patch_step_function wrap this step: the hooks are fired above,
    # and the global hooks fire in the inner step (once, not twice).
    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the trained tensors (the inner optimizer's ``zero_grad``)."""
        if self._zero_grad_arg:
            self.inner.zero_grad(set_to_none=set_to_none)
        elif set_to_none:
            self.inner.zero_grad()
        else:
            for g in self.inner.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.detach_()
                        p.grad.zero_()

    def train(self) -> None:
        """Forwarded to the inner optimizer when it has train/eval modes (schedule-free optimizers)."""
        fn = getattr(self.inner, "train", None)
        if callable(fn):
            fn()

    def eval(self) -> None:
        """See :meth:`train`."""
        fn = getattr(self.inner, "eval", None)
        if callable(fn):
            fn()

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group of *model* parameters to train (they are unfrozen), e.g. a new head.

        The parameters must belong to the model, since the selection is recorded by name.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, not a set")
        else:
            params = list(params) if params is not None else []
        names_by_id = _param_names_by_id(self._module)
        names = []
        for i, p in enumerate(params):
            n = names_by_id.get(id(p))
            if n is None:
                raise ValueError(f"add_param_group: tensor #{i} (shape {tuple(getattr(p, 'shape', ()))}) is not a "
                                 f"parameter of {type(self._module).__name__}; KappaTuneOptimizer records what it "
                                 "trains by parameter name")
            _refuse_quantized(n, p)
            names.append(n)
        self.inner.add_param_group({**param_group, "params": params})
        for p in params:
            p.requires_grad_(True)
        self._selected.extend(names)
        for n in names:
            self._kappa[n] = self._table[n].kappa if n in self._table else math.nan

    # -- checkpoints ----------------------------------------------------------------------
    def _group_names(self) -> List[List[str]]:
        names_by_id = _param_names_by_id(self._module)
        out = []
        for gi, g in enumerate(self.inner.param_groups):
            row = []
            for p in g["params"]:
                n = names_by_id.get(id(p))
                if n is None:
                    raise RuntimeError(f"param group {gi} holds a tensor of shape {tuple(p.shape)} that is not a "
                                       f"parameter of {type(self._module).__name__}; cannot record the selection")
                row.append(n)
            out.append(row)
        return out

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus the selection under ``"kappatune"``.

        The selection record holds, per param group, the parameter names in order, their shapes
        and κ (only plain Python types, so ``torch.load(..., weights_only=True)`` reads it).
        """
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        groups = self._group_names()
        sd = dict(self.inner.state_dict())
        by_name = _named_params(self._module)
        flat = [n for row in groups for n in row]
        sd[STATE_KEY] = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "groups": groups,
            "shapes": {n: [int(s) for s in by_name[n].shape] for n in flat},
            "kappas": {n: float(self._kappa.get(n, math.nan)) for n in flat},
            "model": type(self._module).__name__,
        }
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            res = hook(self, sd)
            if res is not None:
                sd = res
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore the selection and the inner optimizer's state.

        If the saved selection differs from the current one (e.g. κ changed because the model
        was loaded from a fine-tuned checkpoint, or the cache is gone), the saved one wins: the
        model is re-frozen so that exactly the saved tensors train. A selection naming tensors
        the model lacks, or with other shapes, is refused with :class:`ValueError`.
        """
        sd: Mapping[str, Any] = state_dict
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            res = hook(self, sd)
            if res is not None:
                sd = res
        sd = dict(sd)
        rec = sd.pop(STATE_KEY, None)
        if rec is None:
            logger.warning("this optimizer state dict carries no kappatune selection; loading it as the state of "
                           "the current %d selected tensors (their order must match the saved one)",
                           len(self._selected))
            self.inner.load_state_dict(sd)
        else:
            groups = _validate_record(self._module, len(self.inner.param_groups), rec, sd)
            by_name = _named_params(self._module)
            new_params = [[by_name[n] for n in row] for row in groups]
            flat_names = [n for row in groups for n in row]
            old_ids = {id(p) for g in self.inner.param_groups for p in g["params"]}
            new_ids = {id(p) for row in new_params for p in row}
            if new_ids != old_ids:
                logger.info("load_state_dict: restoring the saved selection of %d tensors (was %d)",
                            len(new_ids), len(old_ids))
                for g in self.inner.param_groups:
                    for p in g["params"]:
                        if id(p) not in new_ids:
                            self.inner.state.pop(p, None)
                check_ddp_selection(self.model, [p for row in new_params for p in row])
                self._freeze.restore()
                self._freeze = _freeze_all_but(self._module, [p for row in new_params for p in row])
            for g, row in zip(self.inner.param_groups, new_params):
                g["params"] = list(row)
            self.inner.load_state_dict(sd)
            self._selected = flat_names
            saved_k = rec.get("kappas") or {}
            self._kappa = {n: float(saved_k.get(n, math.nan)) for n in flat_names}
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    @classmethod
    def from_state_dict(cls, model: nn.Module, state_dict: Mapping[str, Any],
                        optimizer: OptimizerFactory = torch.optim.AdamW, **optimizer_kwargs: Any
                        ) -> "KappaTuneOptimizer":
        """Rebuild an optimizer from a saved state dict: the saved tensors, no scan, no cache.

        ``optimizer`` and ``optimizer_kwargs`` should be those of the original run (hyper-parameters
        such as ``lr`` are restored from the state dict; constructor-only flags such as
        ``fused`` are not).
        """
        rec = state_dict.get(STATE_KEY) if isinstance(state_dict, Mapping) else None
        if not isinstance(rec, Mapping) or not isinstance(rec.get("groups"), list) or not rec["groups"]:
            raise ValueError("from_state_dict needs a state dict saved by KappaTuneOptimizer.state_dict() "
                             f"(it has no {STATE_KEY!r} selection record)")
        groups = [list(row) for row in rec["groups"]]
        module = unwrap_model(model)
        groups = _validate_record(module, len(groups), rec, state_dict)
        kappas = rec.get("kappas") or {}
        by_name = _named_params(module)
        entries = [KappaEntry(name=n, kappa=float(kappas.get(n, math.nan)), shape=tuple(by_name[n].shape),
                              numel=by_name[n].numel(), dtype=str(by_name[n].dtype).replace("torch.", ""))
                   for row in groups for n in row]
        opt = cls(model, optimizer, names=groups[0], table=KappaTable(entries), cache_dir=None, progress=False,
                  **optimizer_kwargs)
        for saved, row in zip(state_dict["param_groups"][1:], groups[1:]):
            hyper = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            opt.add_param_group({**hyper, "params": [by_name[n] for n in row]})
        opt.load_state_dict(state_dict)
        return opt

    # -- pickling / deepcopy ------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:  # type: ignore[override]
        # Like torch.optim.Optimizer: hooks (and per-instance patches such as an LR scheduler's
        # step wrapper) are not pickled.
        return {k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__}

    def __setstate__(self, state: Dict[str, Any]) -> None:  # type: ignore[override]
        self._init_hooks()
        self.__dict__.update(state)


def _validate_record(module: nn.Module, n_groups: int, rec: Any, sd: Mapping[str, Any]) -> List[List[str]]:
    """The per-group names of a selection record, checked against ``module`` (ValueError if they do not fit)."""
    model_name = type(module).__name__
    if not isinstance(rec, Mapping) or rec.get("format") != _STATE_FORMAT or not isinstance(rec.get("groups"), list):
        raise ValueError(f"the {STATE_KEY!r} entry of this state dict is not a kappatune selection record")
    if int(rec.get("version", 0)) > _STATE_VERSION:
        raise ValueError(f"this state dict was written by a newer kappatune (selection record version "
                         f"{rec.get('version')} > {_STATE_VERSION}); upgrade kappatune to load it")
    groups = [list(row) for row in rec["groups"]]
    saved_groups = sd.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups) or any(
            len(g.get("params", ())) != len(row) for g, row in zip(saved_groups, groups)):
        raise ValueError("this state dict is inconsistent: its selection record and its param_groups list "
                         "different numbers of tensors")
    if len(groups) != n_groups:
        raise ValueError(f"the state dict has {len(groups)} param group(s), this optimizer "
                         f"{n_groups}; build it with KappaTuneOptimizer.from_state_dict"
                         "(model, state_dict, ...) or add the missing group(s) with add_param_group first")
    by_name = _named_params(module)
    shapes = rec.get("shapes") or {}
    problems = []
    for n in (n for row in groups for n in row):
        p = by_name.get(n)
        if p is None:
            problems.append(f"{n!r} is not a parameter of the model")
            continue
        _refuse_quantized(n, p)
        if n in shapes and tuple(shapes[n]) != tuple(p.shape):
            problems.append(f"{n!r} has shape {tuple(shapes[n])} in the state dict but {tuple(p.shape)} in "
                            "the model")
    if problems:
        saved_for = rec.get("model")
        raise ValueError(
            f"cannot load this optimizer state: its κ selection does not match {model_name}"
            + (f" (it was saved for a {saved_for})" if saved_for and saved_for != model_name else "")
            + f": {'; '.join(problems[:3])}" + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            + ". Load it into the model it was saved for, or start a fresh KappaTuneOptimizer."
        )
    return groups


class SelectiveFineTuningOptimizer(KappaTuneOptimizer):
    """Drop-in replacement for the reference ``SelectiveFineTuningOptimizer`` (same signature).

    Maps onto :class:`KappaTuneOptimizer`: ``num_tensors_to_finetune`` → ``num_tensors``,
    ``max_dim_size_to_analyze`` → ``max_dim``, ``condition_file`` → ``KappaCache(condition_file)``
    (a ``.json`` path; a file in the reference's own name → κ format is not a kappatune cache and
    is left untouched: κ is recomputed), ``optimizer_args`` → the inner optimizer's kwargs. The
    reference attributes ``optimizer``, ``condition_numbers`` and ``trainable_param_names`` are
    kept; unlike the reference it is a real ``torch.optim.Optimizer``.

    Example::

        >>> opt = SelectiveFineTuningOptimizer(model, torch.optim.AdamW, {"lr": 1e-4},
        ...                                    num_tensors_to_finetune=20, max_dim_size_to_analyze=16384)
    """

    def __init__(self, model: nn.Module, base_optimizer_cls: OptimizerFactory, optimizer_args: Dict[str, Any],
                 condition_file: str = "condition_numbers.json", num_tensors_to_finetune: int = 100,
                 recompute: bool = False, max_dim_size_to_analyze: Optional[int] = None) -> None:
        if optimizer_args is None:
            optimizer_args = {}
        if not isinstance(optimizer_args, Mapping):
            raise TypeError(f"optimizer_args must be a dict of keyword arguments for {base_optimizer_cls!r}, "
                            f"got {type(optimizer_args).__name__}")
        self.condition_file = condition_file
        self.num_tensors_to_finetune = num_tensors_to_finetune
        self.recompute = recompute
        self.max_dim_size_to_analyze = max_dim_size_to_analyze
        super().__init__(model, base_optimizer_cls, num_tensors=num_tensors_to_finetune,
                         max_dim=max_dim_size_to_analyze, cache_dir=KappaCache(condition_file),
                         recompute=recompute, progress=False, **dict(optimizer_args))

    _PICKLED = KappaTuneOptimizer._PICKLED + ("condition_file", "num_tensors_to_finetune", "recompute",
                                              "max_dim_size_to_analyze")

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer (the reference's attribute name for :attr:`inner`)."""
        return self.inner

    @property
    def condition_numbers(self) -> Dict[str, float]:
        """name → κ of every analysed tensor (the reference's attribute)."""
        return self._table.kappas

    @property
    def trainable_param_names(self) -> set:
        """Names of the trained tensors (the reference's attribute)."""
        return set(self._selected)
