"""KappaTuneOptimizer: train only the lowest-κ tensors of a model, with any torch optimizer.

:class:`KappaTuneOptimizer` scans the model (through the :class:`~kappatune.cache.KappaCache`),
selects tensors with one policy of :meth:`~kappatune.table.KappaTable.select`, sets
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

import contextlib
import inspect
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .delta import save_delta as _save_delta
from .distributed import (check_ddp_selection, check_same_selection, check_wrapped_model, sharding_kind,
                          unwrap_model)
from .refs import DEFAULT_MAX_DIM, Patterns, clean_name, dtype_name
from .resolve import named_parameters, resolve_selection
from .pipeline import CacheArg
from .selection import FreezeHandle, GroupBy, SelectionPolicy, freeze_all_but
from .table import KappaEntry, KappaTable

__all__ = ["KappaTuneOptimizer"]

logger = logging.getLogger(__name__)

#: Key of the selection record that :meth:`KappaTuneOptimizer.state_dict` adds to the inner
#: optimizer's state dict.
STATE_KEY = "kappatune"
_STATE_FORMAT = "kappatune-selection"
_STATE_VERSION = 1
_MISSING = object()

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _param_names_by_id(module: nn.Module) -> Dict[int, str]:
    """id(parameter) → its first (cleaned) name."""
    out: Dict[int, str] = {}
    for n, p in module.named_parameters():
        out.setdefault(id(p), clean_name(n))
    return out


def _freeze_all_but(module: nn.Module, params: Sequence[torch.Tensor]) -> FreezeHandle:
    """:func:`freeze_all_but` by parameter objects (their names in ``module`` may carry wrapper parts)."""
    raw = {}
    for n, p in module.named_parameters():
        raw.setdefault(id(p), n)
    return freeze_all_but(module, [raw[id(p)] for p in params])


def _refuse_untrainable(name: str, p: torch.Tensor) -> None:
    from .quant import is_quantized_param

    if is_quantized_param(p):
        raise ValueError(
            f"{name!r} is a bitsandbytes-quantized weight ({type(p).__name__}) and cannot be trained by a torch "
            "optimizer; exclude it (exclude=[...]) or fine-tune the quantized model through adapters with "
            "kappatune.integrations.peft"
        )
    if not p.is_floating_point() and not p.is_complex():
        raise ValueError(f"{name!r} has dtype {p.dtype}; only floating-point tensors can be trained")


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _check_factory(optimizer: Any) -> None:
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be an optimizer class or a factory params -> Optimizer, got an instance "
                        f"of {type(optimizer).__name__} (it already holds its parameters); pass "
                        f"{type(optimizer).__name__} and its keyword arguments instead")
    if not callable(optimizer):
        raise TypeError(f"optimizer must be an optimizer class or a callable params -> Optimizer, "
                        f"got {type(optimizer).__name__}")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        hint = ""
        if isinstance(model, (list, tuple)) or inspect.isgenerator(model):
            hint = (" It got parameters or parameter groups, which is what transformers' Trainer passes "
                    "through optimizer_cls_and_kwargs when the kwargs carry no 'model': use "
                    "optimizer_cls_and_kwargs=(KappaTuneOptimizer, {'model': model, ...}) or "
                    "kappatune.integrations.transformers.optimizer_cls_and_kwargs(model, ...).")
        raise TypeError(f"KappaTuneOptimizer needs the model (an nn.Module) to scan and name its tensors, got "
                        f"{type(model).__name__}.{hint}")


def _build_inner(optimizer: OptimizerFactory, params: List[nn.Parameter], kwargs: Dict[str, Any]
                 ) -> torch.optim.Optimizer:
    inner = optimizer(params, **kwargs)
    what = getattr(optimizer, "__name__", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer={what!r} returned {type(inner).__name__}, not a torch.optim.Optimizer")
    held = [p for g in inner.param_groups for p in g["params"]]
    if {id(p) for p in held} != {id(p) for p in params} or len(held) != len(params):
        raise ValueError(f"the optimizer built by {what!r} does not hold exactly the {len(params)} selected "
                         f"tensors it was given (it holds {len(held)}); pass a factory that optimizes the params "
                         "it receives")
    return inner


def _with_frozen_excluded(module: nn.Module, exclude: Patterns) -> List[str]:
    """``exclude`` plus an exact pattern for each parameter that already has ``requires_grad=False``."""
    frozen = sorted({clean_name(n) for n, p in module.named_parameters() if not p.requires_grad})
    given = [] if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude))
    return [*given, *(f"^{re.escape(n)}$" for n in frozen)]


#: The param-group key of the pull toward the pretrained weights (see ``decay_to_init``).
DECAY_KEY = "decay_to_init"


def _check_decay(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {what} value: {value!r}; it must be a finite number >= 0 (0 turns the pull "
                         "toward the pretrained weights off)")


def _resolve_keep_base(keep_base: Any, decay_to_init: float) -> bool:
    if not isinstance(keep_base, bool):
        raise TypeError(f"keep_base must be True or False, got {type(keep_base).__name__}")
    if not keep_base and decay_to_init:
        raise ValueError(f"decay_to_init={decay_to_init} pulls toward the pretrained values, which keep_base=False "
                         "does not keep; pass keep_base=True (the default)")
    return keep_base


def _check_group_decay(value: Any, group: Mapping[str, Any], inner: torch.optim.Optimizer, keep_base: bool) -> None:
    """A param group's ``decay_to_init``: a number >= 0, usable with this optimizer and ``keep_base``."""
    _check_decay(value, f"param group {DECAY_KEY!r}")
    if not value:
        return
    if not keep_base:
        raise ValueError(f"{DECAY_KEY}={value} needs the pretrained values, which this optimizer does not keep "
                         "(keep_base=False); build it with keep_base=True")
    lr = group.get("lr")
    if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
        raise ValueError(f"decay_to_init scales with the learning rate, and {type(inner).__name__}'s param group "
                         f"has lr={lr!r} (e.g. Adafactor with relative_step=True); give the optimizer an explicit "
                         "learning rate (Adafactor: relative_step=False, lr=...)")


def _swap(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the values of two tensors of one shape and dtype, with one tensor of scratch memory."""
    tmp = a.detach().clone()
    a.copy_(b)
    b.copy_(tmp)


def _saved_base(rec: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The pretrained values a selection record carries (``"base"``), checked against ``params``."""
    saved = rec.get("base")
    if saved is None:
        return {}
    if not isinstance(saved, Mapping):
        raise ValueError(f"the {STATE_KEY!r} record's 'base' entry is a {type(saved).__name__}, not name -> tensor; "
                         "the state dict was edited or corrupted")
    out = {}
    for n, t in saved.items():
        p = params.get(n)
        if p is None:
            raise ValueError(f"the state dict keeps the pretrained value of {n!r}, which it does not train; it was "
                             "edited or corrupted")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
            what = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"the state dict's pretrained value of {n!r} is {what}, the parameter has shape "
                             f"{tuple(p.shape)}; load it into the model it was saved for")
        out[n] = t.detach().to(device=p.device, dtype=p.dtype, copy=True)
    return out


def _after_first_call(closure: Callable[[], Any], then: Callable[[], None]) -> Callable[[], Any]:
    """``closure`` that runs ``then()`` once, right after its first call (and before it returns)."""
    pending = [True]

    def wrapped() -> Any:
        out = closure()
        if pending[0]:
            pending[0] = False
            then()
        return out

    return wrapped


def _warn_deprecated(old: str, new: str) -> None:
    warnings.warn(f"KappaTuneOptimizer: {old} is deprecated, use {new}", FutureWarning, stacklevel=3)


class KappaTuneOptimizer(torch.optim.Optimizer):
    r"""Train only the lowest-κ tensors of ``model`` with any torch optimizer.

    The condition number of a weight :math:`W` is :math:`\kappa(W) = \sigma_{\max}(W) /
    \sigma_{\min}(W)`; tensors with low κ are the least specialised and the safest to update
    (arXiv 2506.16289). This optimizer scans ``model``, keeps the tensors chosen by one
    selection policy trainable, freezes all the rest and delegates every step to the inner
    optimizer built over the selected tensors.

    Args:
        model (nn.Module): the model to fine-tune (a ``DistributedDataParallel``/``DataParallel``/
            ``torch.compile`` wrapper is unwrapped; names are those of the inner module).
        optimizer (type or Callable[..., torch.optim.Optimizer], optional): a
            ``torch.optim.Optimizer`` subclass or any callable ``params -> Optimizer``
            (``functools.partial(torch.optim.SGD, momentum=0.9)``, a third-party optimizer
            class). It is called as ``optimizer(selected_params, **optimizer_kwargs)``.
            Default: ``torch.optim.AdamW``.
        num_tensors (Optional[int]): policy: the ``k`` lowest-κ tensors (default ``None``). Give
            exactly one of ``num_tensors``, ``top_fraction``, ``param_budget``, ``max_kappa``,
            ``policy`` or ``names`` (see :class:`~kappatune.selection.SelectionPolicy`).
        top_fraction (Optional[float]): policy: the lowest-κ ``ceil(f · N)`` of the ``N``
            candidates, ``0 < f <= 1`` (default ``None``).
        param_budget (Optional[Union[int, float]]): policy: walking from the lowest κ up, every
            tensor that still fits in the budget; a float ``0 < b <= 1`` is a fraction of the
            candidates' parameters, an int a count (default ``None``).
        max_kappa (Optional[float]): policy: every tensor with ``κ <= t`` (default ``None``).
        names (Optional[Sequence[str]]): an explicit list of parameter names to train (default
            ``None``; no scan is needed; κ is recorded from ``table`` or from the cache when
            available, else NaN).
        group_by (None, str or Callable[[str], Any]): apply the policy per ``"kind"`` (q_proj,
            up_proj, …), per ``"layer"``, or per key of a callable ``name -> key`` (default
            ``None``: over all candidates).
        min_ndim (int): scan filter: skip tensors with fewer dimensions (default ``2``).
        max_dim (Optional[int]): scan filter: skip tensors with a matrix side longer than this;
            ``None``: no limit (default :data:`~kappatune.refs.DEFAULT_MAX_DIM`, 16384: the token
            embedding of a large vocabulary is not a candidate).
        include (None, str or sequence of str): regexes (``re.search`` on the name) a candidate
            must match; they also restrict the candidates of a given ``table`` (default ``None``).
        exclude (None, str or sequence of str): regexes that leave a candidate out (default
            ``None``).
        aggregate (str): ``"mean"`` or ``"max"`` over the matrices of a stacked 3-D parameter
            (default ``"mean"``).
        table (Optional[KappaTable]): a precomputed :class:`KappaTable` of this model (default
            ``None``: scan).
        cache (bool, None, str, PathLike or KappaCache): ``True`` → the default κ cache;
            ``None``/``False`` → no cache; a path or a :class:`KappaCache` (default ``True``).
            ``cache_dir=`` is its deprecated spelling.
        recompute (bool): ignore cached κ values; fresh values are still written to the cache
            (default ``False``).
        progress (Optional[bool]): a progress bar while scanning (default ``None``: only when
            stderr is a terminal).
        policy (SelectionPolicy, optional): a prepared :class:`~kappatune.selection.SelectionPolicy`
            instead of the policy keywords above. Default: ``None``.
        skip_frozen (bool, optional): leave out of the candidates every tensor whose
            ``requires_grad`` is already ``False``. Default: ``False`` (a selected tensor is trained
            even if the model had it frozen, and a warning says how many were unfrozen that way).
        decay_to_init (float, optional): :math:`\lambda \ge 0`, a pull of every trained tensor
            toward its pretrained value :math:`p_0` (L2-SP, Li et al. 2018), applied at every
            step and decoupled from the gradient as AdamW's weight decay is:
            :math:`p \leftarrow p - \eta_t \lambda (p - p_0)`, with :math:`\eta_t` the group's
            current learning rate (schedulers act on it), to each tensor that has a gradient,
            before the inner update (after it when ``step`` gets a closure). A step that
            ``GradScaler`` skips is not decayed. A per-group value goes in the param group under
            ``"decay_to_init"``. The inner optimizer's ``weight_decay`` still pulls toward
            **zero**, i.e. away from the pretrained weights: with both, the tensor is pulled
            toward :math:`\lambda p_0 / (\lambda + \mathrm{wd})`; set ``weight_decay=0`` to pull
            toward :math:`p_0` alone. ``0`` (the default) leaves every step bit for bit as
            without it. Default: ``0.0``.
        keep_base (bool, optional): keep :math:`p_0` of the trained tensors (their size again,
            in their dtype, on their device; :attr:`base_nbytes`), which ``decay_to_init``,
            :meth:`base_weights`, :meth:`save_delta` and :func:`kappatune.measure_forgetting`
            need; it is also carried by :meth:`state_dict`. ``False`` saves that memory.
            Default: ``True``.
        **optimizer_kwargs: passed to ``optimizer`` (``lr``, ``weight_decay``, …). Invalid
            values fail here, with the inner optimizer's own message.

    Attributes:
        inner: the wrapped optimizer. ``param_groups``, ``state`` and ``defaults`` are its own.
        model: the model given.
        selected: names of the trained tensors, lowest κ first.
        table: the :class:`KappaTable` behind the choice (the whole scan).

    The wrapper is initialised through ``torch.optim.Optimizer.__init__`` (as
    ``ZeroRedundancyOptimizer`` is), so torch's hook dictionaries, profiling names and any
    attribute a later torch adds come from torch; while that runs, its resets of ``param_groups``,
    ``state`` and ``defaults`` and its ``add_param_group`` calls are not forwarded to the inner
    optimizer, which already holds the groups.

    Example::

        >>> opt = KappaTuneOptimizer(model, torch.optim.AdamW, param_budget=0.05, lr=2e-5)
        >>> opt.param_groups is opt.inner.param_groups
        True
    """

    _PICKLED = ("inner", "model", "_module", "_table", "_selected", "_kappa", "_freeze", "_zero_grad_arg",
                "_initialized", "_keep_base", "_in_base", "_base")

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
        group_by: GroupBy = None,
        min_ndim: int = 2,
        max_dim: Optional[int] = DEFAULT_MAX_DIM,
        include: Patterns = None,
        exclude: Patterns = None,
        aggregate: str = "mean",
        table: Optional[KappaTable] = None,
        cache: CacheArg = True,
        recompute: bool = False,
        progress: Optional[bool] = None,
        policy: Optional[SelectionPolicy] = None,
        skip_frozen: bool = False,
        decay_to_init: float = 0.0,
        keep_base: bool = True,
        **optimizer_kwargs: Any,
    ) -> None:
        self._initialized = False
        _check_model(model)
        _check_factory(optimizer)
        _check_decay(decay_to_init, "decay_to_init")
        keep_base = _resolve_keep_base(keep_base, decay_to_init)
        if "cache_dir" in optimizer_kwargs:  # the old spelling, not an optimizer argument
            _warn_deprecated("cache_dir=", "cache=")
            cache = optimizer_kwargs.pop("cache_dir")
        policy = SelectionPolicy.resolve(policy, names=names, group_by=group_by,
                                         alternative="names= (an explicit list of parameter names)",
                                         num_tensors=num_tensors, top_fraction=top_fraction,
                                         param_budget=param_budget, max_kappa=max_kappa)
        module = unwrap_model(model)
        check_wrapped_model(model, scanning=names is None and table is None)
        if skip_frozen and names is None:
            exclude = _with_frozen_excluded(module, exclude)
        sel = resolve_selection(module, policy, names=names, include=include, exclude=exclude, table=table,
                                min_ndim=min_ndim, max_dim=max_dim, aggregate=aggregate, cache=cache,
                                recompute=recompute, progress=progress,
                                compare_shapes=sharding_kind(model) != "fsdp1")
        by_name = named_parameters(module)
        params = [by_name[n] for n in sel.names]
        for n, p in zip(sel.names, params):
            _refuse_untrainable(n, p)
        check_same_selection(sel.names)
        check_ddp_selection(model, params)
        unfrozen = [n for n, p in zip(sel.names, params) if not p.requires_grad]
        freeze = _freeze_all_but(module, params)
        try:
            inner = _build_inner(optimizer, params, optimizer_kwargs)
            inner.defaults.setdefault(DECAY_KEY, float(decay_to_init))
            for g in inner.param_groups:
                _check_group_decay(g.setdefault(DECAY_KEY, float(decay_to_init)), g, inner, keep_base)
        except BaseException:
            freeze.restore()
            raise
        if unfrozen:
            logger.warning("KappaTuneOptimizer: %d selected tensor(s) had requires_grad=False and are now trained "
                           "(e.g. %r); pass skip_frozen=True to leave frozen tensors out of the selection",
                           len(unfrozen), unfrozen[0])
        self.model = model
        self._module = module
        self._table: KappaTable = sel.table
        self._freeze: FreezeHandle = freeze
        self.inner: torch.optim.Optimizer = inner
        names_by_id = {id(p): n for n, p in zip(sel.names, params)}
        self._selected: List[str] = [names_by_id[id(p)] for g in inner.param_groups for p in g["params"]]
        self._kappa: Dict[str, float] = {n: float(sel.kappas.get(n, math.nan)) for n in self._selected}
        self._zero_grad_arg = "set_to_none" in inspect.signature(inner.zero_grad).parameters
        self._keep_base = keep_base
        self._in_base = False
        # p₀: the selected tensors' values now, in their dtype and on their device (see base_weights).
        self._base: Dict[str, torch.Tensor] = (
            {n: p.detach().clone() for n, p in zip(self._selected, self._params_in_order())}
            if self._keep_base else {})
        # torch's own initialisation (hooks, step patching, profiling names); see the class docstring.
        torch.optim.Optimizer.__init__(self, params, inner.defaults)
        self._initialized = True
        logger.info("%s", self.summary())

    # -- shared state (the inner optimizer's own objects) -----------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    # While torch.optim.Optimizer.__init__ runs, its resets are not forwarded (the inner optimizer
    # already holds the groups and its fresh state): see the class docstring.
    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        if self._initialized:
            self.inner.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        if self._initialized:
            self.inner.state = value

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        if self._initialized:
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
    def table(self) -> KappaTable:
        """The :class:`KappaTable` behind the selection (the whole scan)."""
        return self._table

    @property
    def kappas(self) -> KappaTable:
        """Deprecated spelling of :attr:`table`."""
        _warn_deprecated("opt.kappas", "opt.table")
        return self._table

    def _params_in_order(self) -> List[torch.Tensor]:
        """The trained tensors, in the order of :attr:`selected`."""
        return [p for g in self.inner.param_groups for p in g["params"]]

    @property
    def base_nbytes(self) -> int:
        """Bytes held for the pretrained values ``p₀`` of the trained tensors (0 with ``keep_base=False``).

        Exactly the trained tensors' own size: ``Σ_selected numel · element size`` (the local shards
        under FSDP).
        """
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def _refuse_in_base(self, what: str) -> None:
        if self._in_base:
            raise RuntimeError(f"{what} cannot run inside opt.base_weights(): the model holds the pretrained values "
                               "there (and the kept values the trained ones); leave the block first")

    def _require_base(self, what: str) -> None:
        if not self._keep_base:
            raise RuntimeError(f"{what} needs the pretrained values of the trained tensors, which this optimizer "
                               "does not keep (it was built with keep_base=False); build it with keep_base=True")
        self._refuse_in_base(what)

    def _bases(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, p₀)`` of every trained tensor; p₀ follows a later ``model.to(dtype/device)``.

        A model converted after this optimizer was built (``model.double()``, ``model.cuda()``) has
        its p₀ converted the same way here, once, so that a swap or a pull never mixes dtypes.
        """
        out = []
        for n, p in zip(self._selected, self._params_in_order()):
            b = self._base[n]
            if b.dtype != p.dtype or b.device != p.device:
                b = self._base[n] = b.to(device=p.device, dtype=p.dtype)
            out.append((p, b))
        return out

    @contextlib.contextmanager
    def base_weights(self) -> Iterator[nn.Module]:
        r"""The model with its pretrained weights, for the duration of a ``with`` block.

        Inside the block every trained tensor holds its value ``p₀`` from when this optimizer was
        built (or when it was added with :meth:`add_param_group`, or the value restored by
        :meth:`load_state_dict`), and every other tensor was never changed, so the model **is** the
        pretrained model bit for bit, without a second copy of it: the values are swapped in place,
        one tensor at a time (the only extra memory is one tensor). On exit, also on an exception,
        the trained values are swapped back bit for bit.

        Gradients, the optimizer state and the training step are untouched; :meth:`step` inside the
        block raises :class:`RuntimeError`. The swap is an in-place write, so an autograd graph
        built before the block and used for ``backward()`` after it is refused by autograd (run the
        block between steps, not between a forward and its backward).

        Yields:
            nn.Module: the model given to the optimizer.

        Raises:
            RuntimeError: with ``keep_base=False``; when already inside such a block; on an
                FSDP-sharded model (each rank holds only a shard of the weights, so the swap would
                have to be a collective: call it on the model before wrapping instead).

        Example::

            >>> with opt.base_weights():
            ...     base_loss = model(**batch).loss      # the pretrained model
            >>> tuned_loss = model(**batch).loss         # the fine-tuned one again
        """
        self._require_base("base_weights()")
        if sharding_kind(self.model) is not None:
            raise RuntimeError("base_weights() does not serve an FSDP-sharded model: each rank holds only shards of "
                               "the weights, so the pretrained model cannot be swapped in exactly by one rank; "
                               "measure forgetting on an unsharded copy (or with DDP)")
        pairs = self._bases()
        self._in_base = True
        done = 0
        try:
            with torch.no_grad():
                for p, b in pairs:
                    _swap(p, b)
                    done += 1
            yield self.model
        finally:
            with torch.no_grad():
                for p, b in pairs[:done]:
                    _swap(p, b)
            self._in_base = False

    def save_delta(self, path: Union[str, "os.PathLike[str]"], *, overwrite: bool = False) -> Path:
        """Write what training changed as a delta folder; :func:`kappatune.apply_delta` blends it back.

        See :func:`kappatune.delta.save_delta` for the folder's contents. The folder holds the
        trained tensors' current values, so ``apply_delta(base_model, path, alpha=1.0)`` gives this
        model bit for bit, and the digest of each tensor's pretrained value, so that the delta is
        never applied to another base.

        Args:
            path (str or PathLike): the folder to create (it must not exist, or be empty).
            overwrite (bool, optional): replace the delta files of an existing delta folder.
                Default: ``False``.

        Returns:
            Path: the folder written.
        """
        self._require_base("save_delta()")
        if sharding_kind(self.model) is not None:
            raise RuntimeError("save_delta() needs whole tensors and the model is FSDP-sharded; gather them first "
                               "(e.g. FSDP's state_dict with full_state_dict=True) or save the delta on rank 0 of an "
                               "unsharded model")
        self._bases()
        tuned = dict(zip(self._selected, self._params_in_order()))
        rows = {n: self._table[n] for n in self._selected if n in self._table}
        return _save_delta(path, tuned=tuned, base=self._base, entries=rows, model=self._module, overwrite=overwrite,
                          extra={"optimizer": type(self.inner).__name__,
                                 "decay_to_init": [g.get(DECAY_KEY, 0.0) for g in self.inner.param_groups]})

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
        base = (f"; pretrained values kept: {_fmt_count(self.base_nbytes)}B" if self._keep_base
                else "; pretrained values not kept")
        return (f"KappaTuneOptimizer({type(self.inner).__name__}): training {n_sel} of {n_all} tensors{about_s}, "
                f"{trained:,} of {total:,} parameters ({frac:.2f}%); all others frozen{base}")

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

        Args:
            closure (Callable[[], Any], optional): re-evaluates the model and returns the loss, as
                ``torch.optim.Optimizer.step`` takes it (LBFGS); with ``decay_to_init`` the pull
                toward :math:`p_0` comes right after its first call. Default: ``None``.
            **kwargs: passed to the inner optimizer's ``step``.

        Raises:
            RuntimeError: called inside :meth:`base_weights`, or a step pre-hook returning
                something other than ``None`` or ``(args, kwargs)``.
        """
        if self._in_base:
            raise RuntimeError("step() inside opt.base_weights(): the model holds the pretrained values there and "
                               "the update would be lost on exit; step outside the block")
        args: Tuple[Any, ...] = (self,) if closure is None else (self, closure)
        for hook in list(self._optimizer_step_pre_hooks.values()):
            res = hook(self, args, kwargs)
            if res is not None:
                if not (isinstance(res, tuple) and len(res) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {res!r}")
                args, kwargs = res
        inner = self.inner
        handed = {a: self.__dict__[a] for a in ("grad_scale", "found_inf") if a in self.__dict__}
        decay = self._keep_base and any(g.get(DECAY_KEY, 0.0) for g in inner.param_groups) and not (
            "found_inf" in handed and bool(handed["found_inf"]))  # GradScaler skips this step
        if decay and len(args) == 1:
            self._decay_toward_base()
        elif decay:  # the gradients exist once the closure ran: pull right after its first call, as without one
            args = (self, _after_first_call(args[1], self._decay_toward_base))
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

    @torch.no_grad()
    def _decay_toward_base(self) -> None:
        """``p ← p − lr · λ · (p − p₀)`` for each trained tensor that has a gradient (``lerp`` toward p₀)."""
        pairs = iter(self._bases())
        for g in self.inner.param_groups:
            group = [next(pairs) for _ in g["params"]]
            lam = g.get(DECAY_KEY, 0.0)
            w = float(g["lr"]) * float(lam) if lam else 0.0
            if w == 0.0:
                continue
            for p, b in group:
                if p.grad is not None:
                    p.lerp_(b, w)

    # Never let torch.optim.Optimizer._patch_step_function wrap this step: the hooks are fired above,
    # and the global hooks fire in the inner step (once, not twice).
    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the trained tensors (the inner optimizer's ``zero_grad``).

        Args:
            set_to_none (bool, optional): set each ``.grad`` to ``None`` instead of zeroing it in
                place. Default: ``True``.
        """
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

        Args:
            param_group (Dict[str, Any]): ``{"params": tensors, **hyper-parameters}`` as
                ``torch.optim.Optimizer.add_param_group`` takes it; hyper-parameters not given
                (``lr``, ``decay_to_init``, …) are the inner optimizer's defaults.

        Raises:
            TypeError: ``param_group`` not a dict, or its ``params`` a set.
            ValueError: a tensor that is not a parameter of the model, one that cannot be trained, or
                a ``decay_to_init`` the group cannot take (negative, without ``keep_base``, without ``lr``).
            RuntimeError: called inside :meth:`base_weights`.
        """
        if not self._initialized:  # torch.optim.Optimizer.__init__: the inner optimizer holds the groups
            return
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
            _refuse_untrainable(n, p)
            names.append(n)
        self._refuse_in_base("add_param_group()")
        group = {**self.inner.defaults, **param_group}
        _check_group_decay(group.get(DECAY_KEY, 0.0), group, self.inner, self._keep_base)
        self.inner.add_param_group({**param_group, "params": params})
        for p in params:
            p.requires_grad_(True)
        if self._keep_base:
            for n, p in zip(names, params):
                self._base[n] = p.detach().clone()
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
        and κ, and (with ``keep_base=True``) under ``"base"`` the pretrained value ``p₀`` of each
        trained tensor, so that ``decay_to_init`` and :meth:`base_weights` resume exactly: plain
        Python types and tensors, which ``torch.load(..., weights_only=True)`` reads. ``p₀`` adds
        the trained tensors' size once more to the file (AdamW's state is twice that size).
        """
        self._refuse_in_base("state_dict()")
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        groups = self._group_names()
        sd = dict(self.inner.state_dict())
        by_name = named_parameters(self._module)
        flat = [n for row in groups for n in row]
        sd[STATE_KEY] = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "groups": groups,
            "shapes": {n: [int(s) for s in by_name[n].shape] for n in flat},
            "kappas": {n: float(self._kappa.get(n, math.nan)) for n in flat},
            "model": type(self._module).__name__,
        }
        if self._keep_base:  # p₀, so that decay_to_init and base_weights() resume exactly
            sd[STATE_KEY]["base"] = {n: b for n, (_, b) in zip(self._selected, self._bases())}
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
        the model lacks, or with other shapes, is refused with :class:`ValueError`; so is a plain
        ``torch.optim`` state dict (no selection record) whose param groups or state tensors do
        not fit the selected tensors. The pretrained values ``p₀`` the state dict carries replace
        the ones kept since construction.

        Args:
            state_dict (Mapping[str, Any]): from :meth:`state_dict` (or a plain ``torch.optim``
                state dict of the same selected tensors).
        """
        self._refuse_in_base("load_state_dict()")
        sd: Mapping[str, Any] = state_dict
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            res = hook(self, sd)
            if res is not None:
                sd = res
        sd = dict(sd)
        rec = sd.pop(STATE_KEY, None)
        if rec is None:
            # A plain torch.optim state dict: refuse one that cannot fit the selected tensors (another
            # model's or another selection's) here, with the reason, not with a crash in step().
            ours = [len(g["params"]) for g in self.inner.param_groups]
            saved = sd.get("param_groups")
            counts = ([len(g.get("params", ())) if isinstance(g, Mapping) else None for g in saved]
                      if isinstance(saved, list) else None)
            refuse = ("cannot load this optimizer state: it carries no kappatune selection and {}; it was saved for "
                      "another model or selection. Load a state dict written by KappaTuneOptimizer.state_dict(), "
                      "or start a fresh optimizer.")
            if counts != ours:
                raise ValueError(refuse.format(f"its param groups hold {counts} tensor(s), but this optimizer's "
                                               f"hold {ours} (the selected tensors)"))
            # State that torch's optimizers (and bitsandbytes') keep in the shape of the parameter.
            shaped = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                      "acc_delta", "grad_avg", "sum", "prev", "step_size", "ax", "variance", "state1", "state2")
            index = {i: p for g, o in zip(saved, self.inner.param_groups) for i, p in zip(g["params"], o["params"])}
            names_by_id = _param_names_by_id(self._module)
            for i, st in (sd.get("state") or {}).items():
                p = index.get(i)
                for k in shaped if p is not None and isinstance(st, Mapping) else ():
                    v = st.get(k)
                    if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(p.shape):
                        raise ValueError(refuse.format(
                            f"its {k!r} of tensor #{i} has shape {tuple(v.shape)}, but the selected tensor there, "
                            f"{names_by_id.get(id(p), '?')!r}, has shape {tuple(p.shape)}"))
            logger.warning("this optimizer state dict carries no kappatune selection; loading it as the state of "
                           "the current %d selected tensors (their order must match the saved one)",
                           len(self._selected))
            self.inner.load_state_dict(sd)
        else:
            self._load_with_selection(sd, rec)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def _load_with_selection(self, sd: Dict[str, Any], rec: Any) -> None:
        """Switch to the saved selection and load the inner state; all or nothing."""
        groups = _validate_record(self._module, len(self.inner.param_groups), rec, sd)
        by_name = named_parameters(self._module)
        saved_base = _saved_base(rec, {n: by_name[n] for row in groups for n in row})
        if not self._keep_base:
            decaying = [g.get(DECAY_KEY) for g in sd["param_groups"] if g.get(DECAY_KEY)]
            if decaying:
                raise ValueError(f"this state dict trains with {DECAY_KEY}={decaying[0]}, which needs the pretrained "
                                 "values, and this optimizer was built with keep_base=False; build it with "
                                 "keep_base=True to resume it")
        new_params = [[by_name[n] for n in row] for row in groups]
        flat_params = [p for row in new_params for p in row]
        inner = self.inner
        # What a failure must put back exactly: flags, groups (their lists), state, selection.
        flags = [(p, p.requires_grad) for p in self._module.parameters()]
        old_groups, old_rows = inner.param_groups, [g["params"] for g in inner.param_groups]
        old_state, old_freeze = inner.state, self._freeze
        old_ids = {id(p) for row in old_rows for p in row}
        new_freeze = None
        try:
            if {id(p) for p in flat_params} != old_ids:
                logger.info("load_state_dict: restoring the saved selection of %d tensors (was %d)",
                            len(flat_params), len(old_ids))
                check_ddp_selection(self.model, flat_params)
                old_freeze.restore()
                new_freeze = _freeze_all_but(self._module, flat_params)
            for g, row in zip(inner.param_groups, new_params):
                g["params"] = list(row)
            inner.load_state_dict(sd)
        except BaseException:
            for g, row in zip(old_groups, old_rows):
                g["params"] = row
            inner.param_groups, inner.state = old_groups, old_state
            for p, flag in flags:
                p.requires_grad_(flag)
            old_freeze.restored = False
            self._freeze = old_freeze
            raise
        if new_freeze is not None:
            self._freeze = new_freeze
        self._selected = [n for row in groups for n in row]
        for g in inner.param_groups:  # a state dict saved before decay_to_init existed
            g.setdefault(DECAY_KEY, inner.defaults.get(DECAY_KEY, 0.0))
        if self._keep_base:
            fresh = [n for n in self._selected if n not in saved_base and n not in self._base]
            self._base = {n: saved_base[n] if n in saved_base else self._base[n] if n in self._base
                          else by_name[n].detach().clone() for n in self._selected}
            if fresh or (len(saved_base) < len(self._selected) and any(g[DECAY_KEY] for g in inner.param_groups)):
                logger.warning("load_state_dict: the state dict keeps no pretrained value for %d trained tensor(s) "
                               "(e.g. %r); decay_to_init and base_weights() use their values before this load",
                               len(self._selected) - len(saved_base),
                               next(n for n in self._selected if n not in saved_base))
        saved_k = rec.get("kappas") or {}
        self._kappa = {n: float(saved_k.get(n, math.nan)) for n in self._selected}

    @classmethod
    def from_state_dict(cls, model: nn.Module, state_dict: Mapping[str, Any],
                        optimizer: OptimizerFactory = torch.optim.AdamW, **optimizer_kwargs: Any
                        ) -> "KappaTuneOptimizer":
        """Rebuild an optimizer from a saved state dict: the saved tensors, no scan, no cache.

        ``optimizer`` and ``optimizer_kwargs`` should be those of the original run (hyper-parameters
        such as ``lr`` are restored from the state dict; constructor-only flags such as
        ``fused`` are not).

        Args:
            model (nn.Module): the model to train, with the parameters the state dict names.
            state_dict (Mapping[str, Any]): from :meth:`state_dict` (it carries the selection record).
            optimizer (type or Callable[..., torch.optim.Optimizer], optional): as for
                :class:`KappaTuneOptimizer`. Default: ``torch.optim.AdamW``.
            **optimizer_kwargs: passed to ``optimizer``, as for :class:`KappaTuneOptimizer`.

        Raises:
            ValueError: a state dict without a kappatune selection record, or one naming tensors the
                model lacks or with other shapes.
        """
        rec = state_dict.get(STATE_KEY) if isinstance(state_dict, Mapping) else None
        if not isinstance(rec, Mapping) or not isinstance(rec.get("groups"), list) or not rec["groups"]:
            raise ValueError("from_state_dict needs a state dict saved by KappaTuneOptimizer.state_dict() "
                             f"(it has no {STATE_KEY!r} selection record)")
        groups = [list(row) for row in rec["groups"]]
        module = unwrap_model(model)
        groups = _validate_record(module, len(groups), rec, state_dict)
        kappas = rec.get("kappas") or {}
        by_name = named_parameters(module)
        entries = [KappaEntry(name=n, kappa=float(kappas.get(n, math.nan)), shape=tuple(by_name[n].shape),
                              numel=by_name[n].numel(), dtype=dtype_name(by_name[n].dtype))
                   for row in groups for n in row]
        opt = cls(model, optimizer, names=groups[0], table=KappaTable(entries), cache=None, progress=False,
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
        self._refuse_in_base("pickling or copying the optimizer")
        return {k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__}

    def __setstate__(self, state: Dict[str, Any]) -> None:  # type: ignore[override]
        self.__dict__.update(state)
        torch.optim.Optimizer.__setstate__(self, {})  # torch's hooks and step patching


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
    ids = [i for g in saved_groups for i in g.get("params", ())]
    if len(set(map(repr, ids))) != len(ids):
        raise ValueError("this state dict is inconsistent: its param_groups list the same parameter index twice; "
                         "it was edited or corrupted, load a state dict written by state_dict()")
    by_name = named_parameters(module)
    shapes = rec.get("shapes") or {}
    problems = []
    owner: Dict[int, str] = {}
    for gi, row in enumerate(groups):
        for n in row:
            if not isinstance(n, str):
                raise ValueError(f"the {STATE_KEY!r} selection record of this state dict names a tensor by "
                                 f"{type(n).__name__} {n!r}, not by name; it was edited or corrupted")
    for n in (n for row in groups for n in row):
        p = by_name.get(n)
        if p is None:
            problems.append(f"{n!r} is not a parameter of the model")
            continue
        if id(p) in owner:
            first = owner[id(p)]
            same = "is listed twice" if first == n else f"and {first!r} are the same (tied) tensor"
            raise ValueError(f"cannot load this optimizer state: its κ selection names one tensor more than once "
                             f"({n!r} {same}), so a step would update it twice; it was edited or corrupted. Load a "
                             "state dict written by state_dict(), or start a fresh KappaTuneOptimizer.")
        owner[id(p)] = n
        _refuse_untrainable(n, p)
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
