"""LoRA / QLoRA targets chosen by condition number, for PEFT.

The bridge for adapter users: the same κ as full-weight kappatune (exact, float64, from
:func:`kappatune.scan` and its on-disk cache, 4-bit and 8-bit bitsandbytes weights dequantized),
handed to PEFT as ``target_modules`` / ``target_parameters``.

* :func:`find_kappa_target_modules` has the signature and the return value of
  ``peft.helpers.find_kappa_target_modules`` (PEFT ≥ 0.19's ``KappaTuneSelector``): switching is
  a change of import. It adds the other selection policies (``num_modules``, ``threshold``,
  ``param_budget``) and kappatune's scan options (``cache``, ``recompute``, ``table``, …).
* :func:`get_kappa_lora_config` / :func:`get_kappatune_lora_model`: the original kappaTune
  one-liners, ``LoraConfig`` / ``PeftModel`` with LoRA on the ``num_modules_to_adapt`` lowest-κ
  targets.
* :func:`kappa_lora_targets`: every candidate target with its κ, lowest first.

Candidates are what LoRA adapts: every ``nn.Linear`` module (bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` included; transformers' ``Conv1D`` too, which PEFT's own selector misses) and
every 3-D parameter whose name ends in one of ``moe_param_suffixes`` (the fused expert stacks of
Qwen3-MoE, Mixtral, OLMoE, Llama-4 … in transformers ≥ 5), whose κ is the mean of its experts'
κ. A module's κ is the κ of its weight (so a tied ``lm_head`` has the κ of the embedding).

Names are full module paths (``model.layers.3.self_attn.q_proj``) and full parameter names
(``model.layers.0.mlp.experts.gate_up_proj``). PEFT matches a list entry ``t`` against a module
key ``k`` when ``k == t`` or ``k.endswith("." + t)``; a full path from the model's root therefore
hits only its own module, unless another module's path ends with it (a wrapped copy of the same
sub-model). :func:`get_kappa_lora_config` detects that and then passes an exact regular
expression instead of the list; :func:`find_kappa_target_modules` warns.

Requires ``peft`` only for the config / model helpers (``pip install kappatune[peft]``).

Example::

    >>> from kappatune.integrations.peft import find_kappa_target_modules
    >>> targets = find_kappa_target_modules(model, top_p=0.2)
    >>> config = LoraConfig(r=16, target_modules=targets["target_modules"],
    ...                     target_parameters=targets["target_parameters"])
    >>> model = get_peft_model(model, config)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..refs import DEFAULT_MAX_DIM, Eligibility, NameFilter, Patterns
from ..pipeline import CacheArg, model_refs, scan_refs
from ..selection import SelectionPolicy
from ..table import SCORES, KappaEntry, KappaTable

__all__ = [
    "LoraTarget",
    "DEFAULT_MOE_PARAM_SUFFIXES",
    "kappa_lora_targets",
    "find_kappa_target_modules",
    "get_kappa_lora_config",
    "get_kappatune_lora_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MOE_PARAM_SUFFIXES: Tuple[str, ...] = (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA target and its κ.

    ``kind`` is ``"module"`` (goes to ``target_modules``) or ``"parameter"`` (a fused 3-D expert
    stack, goes to ``target_parameters``); ``param`` is the parameter analysed (its name in the
    κ table; for a tied ``lm_head`` the embedding's name); ``numel`` its size.

    Attributes:
        name (str): the target's name: a module path (``kind="module"``) or a parameter name
            (``kind="parameter"``).
        kind (str): ``"module"`` or ``"parameter"``.
        param (str): the parameter analysed, its name in the κ table.
        kappa (float): κ of that parameter, :math:`\\sigma_{\\max}/\\sigma_{\\min}` (for an expert
            stack the aggregate over its matrices).
        numel (int): its number of elements.
        shape (Tuple[int, ...]): its shape.
    """

    name: str
    kind: str
    param: str
    kappa: float
    numel: int
    shape: Tuple[int, ...]


# -- candidates ---------------------------------------------------------------------------
def _is_lora_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _candidates(model: nn.Module, suffixes: Tuple[str, ...]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(module name, canonical weight name) of every LoRA-able linear layer; 3-D expert params."""
    canonical: Dict[int, str] = {}
    for name, p in model.named_parameters():  # tied weights once, under their first name
        canonical.setdefault(id(p), name)
    modules: List[Tuple[str, str]] = []
    for mname, mod in model.named_modules():
        if not _is_lora_linear(mod):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and id(w) in canonical:
            modules.append((mname, canonical[id(w)]))
    params = [name for name, p in model.named_parameters()
              if p.dim() == 3 and any(name.endswith(s) for s in suffixes)]
    return modules, params


def _check_suffixes(moe_param_suffixes: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if moe_param_suffixes is None:
        return DEFAULT_MOE_PARAM_SUFFIXES
    if isinstance(moe_param_suffixes, str):
        moe_param_suffixes = (moe_param_suffixes,)
    out = tuple(moe_param_suffixes)
    if not all(isinstance(s, str) and s for s in out):
        raise ValueError(f"moe_param_suffixes must be a tuple of non-empty strings, got {moe_param_suffixes!r}")
    return out


def kappa_lora_targets(
    model: nn.Module,
    *,
    max_dim_size_to_analyze: Optional[int] = DEFAULT_MAX_DIM,
    moe_param_suffixes: Optional[Sequence[str]] = None,
    show_progress: bool = True,
    table: Optional[KappaTable] = None,
    cache: CacheArg = True,
    recompute: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    aggregate: str = "mean",
) -> List[LoraTarget]:
    """Every candidate LoRA target of ``model`` with its κ, lowest κ first (ties by name).

    Args:
        model (nn.Module): the (possibly 4-bit / 8-bit quantized) base model.
        max_dim_size_to_analyze (int, optional): skip weights with a matrix side longer than this
            (as PEFT); ``None`` analyses all. Default: :data:`~kappatune.refs.DEFAULT_MAX_DIM`
            (16384).
        moe_param_suffixes (Sequence[str], optional): name endings of fused 3-D expert parameters.
            Default: ``None`` (``(".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")``).
        show_progress (bool, optional): a progress bar during the scan (on a terminal only).
            Default: ``True``.
        table (KappaTable, optional): a :class:`~kappatune.KappaTable` from an earlier
            :func:`kappatune.scan` of this model to take κ from instead of scanning (targets whose
            weight it lacks are left out). Default: ``None`` (scan).
        cache (bool, None, str, PathLike or KappaCache): the κ cache, as in
            :func:`kappatune.scan` (default ``True``: the default cache).
        recompute (bool): ignore cached κ values (default ``False``).
        include (None, str or sequence of str): regexes (``re.search``) on the target names
            (module paths / parameter names) a candidate must match (default ``None``).
        exclude (None, str or sequence of str): regexes that leave a candidate out (default
            ``None``).
        aggregate (str): ``"mean"`` or ``"max"`` over the experts of a fused 3-D parameter
            (default ``"mean"``).

    Raises:
        TypeError: ``model`` not an ``nn.Module``, or ``table`` not a :class:`~kappatune.KappaTable`.
        ValueError: a ``table`` that holds none of the model's candidate weights, or invalid
            ``moe_param_suffixes``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    eligible = Eligibility(max_dim=max_dim_size_to_analyze, arg_names=("min_ndim", "max_dim_size_to_analyze"))
    suffixes = _check_suffixes(moe_param_suffixes)
    wanted = NameFilter(include, exclude)
    modules, params = _candidates(model, suffixes)

    modules = [(m, p) for m, p in modules if wanted(m)]
    params = [p for p in params if wanted(p)]
    needed = {p for _, p in modules} | set(params)

    if table is None:
        refs = [r for r in model_refs(model) if r.name in needed]
        table = scan_refs(refs, max_dim=max_dim_size_to_analyze, cache=cache, recompute=recompute,
                          aggregate=aggregate,
                          progress=None if show_progress else False)  # tqdm's convention: on a terminal
    elif not isinstance(table, KappaTable):
        raise TypeError(f"table must be a KappaTable (from kappatune.scan), got {type(table).__name__}")
    else:
        unknown = [n for n in needed if n not in table]
        if unknown and len(unknown) == len(needed):
            raise ValueError(
                f"table holds none of this model's {len(needed)} candidate weights (e.g. {sorted(needed)[:1]}); "
                "was it scanned from another model? Scan this model, or pass table=None"
            )

    def entry(pname: str) -> Optional[KappaEntry]:
        if pname not in table:
            return None
        e = table[pname]
        return None if eligible.reason(e.name, e.shape, e.layout) else e

    out: List[LoraTarget] = []
    for mname, pname in modules:
        e = entry(pname)
        if e is not None:
            out.append(LoraTarget(mname, "module", pname, e.kappa, e.numel, tuple(e.shape)))
    for pname in params:
        e = entry(pname)
        if e is not None:
            out.append(LoraTarget(pname, "parameter", pname, e.kappa, e.numel, tuple(e.shape)))
    out.sort(key=lambda t: (SCORES["kappa"].key(t.kappa), t.name))
    return out


# -- PEFT-compatible selection --------------------------------------------------------------
# PEFT's spellings of kappatune's policies: a thin translation into SelectionPolicy, which holds the
# rule ("at most one", PEFT having top_p as its default) and every value check.
_PEFT_SPELLING = {"num_tensors": "num_modules=", "max_kappa": "threshold=", "top_fraction": "top_p="}


def _peft_policy(top_p: Optional[float], num_modules: Optional[int], threshold: Optional[float],
                 param_budget: Optional[Union[int, float]]) -> Optional[SelectionPolicy]:
    """The :class:`SelectionPolicy` of PEFT's arguments (``None``: ``top_p``, applied per group)."""
    if top_p is not None:  # checked as a fraction, in PEFT's name, even where another policy overrides it
        SelectionPolicy.resolve(spelling=_PEFT_SPELLING, top_fraction=top_p)
    return SelectionPolicy.resolve(spelling=_PEFT_SPELLING, default="top_p=", num_tensors=num_modules,
                                   max_kappa=threshold, param_budget=param_budget)


def _targets_table(targets: List[LoraTarget]) -> KappaTable:
    return KappaTable([KappaEntry(name=x.name, kappa=x.kappa, shape=x.shape, numel=x.numel, dtype="")
                       for x in targets])


def _pick(group: List[LoraTarget], policy: Optional[SelectionPolicy], top_p: Optional[float]) -> List[str]:
    """One group's targets, lowest κ first: ``policy``, or PEFT's ``top_p`` rule
    (the ``max(1, int(n · top_p))`` lowest), or every target without either."""
    if not group:
        return []
    if policy is None:
        if top_p is None:
            return [t.name for t in group]
        policy = SelectionPolicy(num_tensors=max(1, int(len(group) * top_p)))
    if policy.name == "num_tensors":  # PEFT: min(k, n) per group, without a warning
        policy = SelectionPolicy(num_tensors=min(policy.value, len(group)))
    return policy.apply(_targets_table(group), allow_empty=True)


def _collisions(names: Iterable[str], keys: Iterable[str]) -> Dict[str, List[str]]:
    """For each name, the other keys that PEFT's list matching (``k == t or k.endswith('.' + t)``) hits."""
    wanted = set(names)
    hits: Dict[str, List[str]] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in wanted:
                hits.setdefault(suffix, []).append(k)
    return hits


def _param_keys(model: nn.Module) -> List[str]:
    return [f"{m}.{p}" if m else p for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)]


def find_kappa_target_modules(
    model: nn.Module,
    top_p: Optional[float] = 0.2,
    max_dim_size_to_analyze: Optional[int] = DEFAULT_MAX_DIM,
    moe_param_suffixes: Optional[Tuple[str, ...]] = None,
    show_progress: bool = True,
    *,
    num_modules: Optional[int] = None,
    threshold: Optional[float] = None,
    param_budget: Optional[Union[int, float]] = None,
    table: Optional[KappaTable] = None,
    cache: CacheArg = True,
    recompute: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    aggregate: str = "mean",
) -> Dict[str, Optional[List[str]]]:
    """Lowest-κ LoRA targets in PEFT's format: ``{"target_modules": [...], "target_parameters": [...] | None}``.

    A drop-in for ``peft.helpers.find_kappa_target_modules`` (same positional arguments, same
    return value, same selection rules), computed with kappatune's exact κ and κ cache.

    Modules (``target_modules``) and fused 3-D expert parameters (``target_parameters``) are
    ranked separately, lowest κ first, and each group keeps

    * ``top_p`` (default): its ``max(1, int(n · top_p))`` lowest-κ members, as PEFT;
    * ``num_modules=k``: its ``min(k, n)`` lowest-κ members;
    * ``threshold=t``: every member with ``κ <= t`` (possibly none, as PEFT);
    * ``param_budget=b`` (kappatune): the two groups ranked together, every target that still fits
      a budget of ``b`` weights (a fraction ``0 < b <= 1`` of the candidates' weights, or a count).

    ``num_modules`` / ``threshold`` / ``param_budget`` override ``top_p``; give at most one.
    ``target_parameters`` is ``None`` when the model has no fused expert parameter (PEFT's
    convention). The remaining keywords are those of :func:`kappa_lora_targets`.

    Differences from PEFT, on purpose: κ is exact (float64, no ``+1e-8`` in the denominator, a
    rank-deficient weight gets ``κ = inf``), ties are broken by name, κ values are cached on disk
    by content, and transformers' ``Conv1D`` layers (GPT-2) are candidates too.

    Args:
        model (nn.Module): the (possibly 4-bit / 8-bit quantized) base model.
        top_p (float, optional): per group, keep the :math:`\\max(1, \\lfloor n \\cdot p \\rfloor)`
            lowest-κ of its :math:`n` members, :math:`0 < p \\le 1`; ``None`` with no other policy
            keeps every target. Default: ``0.2``.
        max_dim_size_to_analyze (int, optional): skip weights with a matrix side longer than this;
            ``None`` analyses all. Default: :data:`~kappatune.refs.DEFAULT_MAX_DIM` (16384).
        moe_param_suffixes (Tuple[str, ...], optional): name endings of fused 3-D expert
            parameters. Default: ``None`` (``(".gate_up_proj", ".down_proj", ".gate_proj",
            ".up_proj")``).
        show_progress (bool, optional): a progress bar during the scan (on a terminal only).
            Default: ``True``.
        num_modules (int, optional): per group, the :math:`\\min(k, n)` lowest-κ members. Default:
            ``None``.
        threshold (float, optional): every member with :math:`\\kappa \\le t`. Default: ``None``.
        param_budget (int or float, optional): both groups together, lowest κ first, every target
            that still fits :math:`b` weights (a fraction :math:`0 < b \\le 1` of the candidates'
            weights, or a count). Default: ``None``.
        table (KappaTable, optional): κ from an earlier :func:`kappatune.scan` of this model
            instead of scanning. Default: ``None`` (scan).
        cache (bool, None, str, PathLike or KappaCache, optional): the κ cache, as in
            :func:`kappatune.scan`. Default: ``True`` (the default cache).
        recompute (bool, optional): ignore cached κ values. Default: ``False``.
        include (None, str or sequence of str, optional): regexes (``re.search``) on the target
            names a candidate must match. Default: ``None``.
        exclude (None, str or sequence of str, optional): regexes that leave a candidate out.
            Default: ``None``.
        aggregate (str, optional): ``"mean"`` or ``"max"`` over the experts of a fused 3-D
            parameter. Default: ``"mean"``.

    Raises:
        ValueError: more than one of ``num_modules``, ``threshold``, ``param_budget``, or a value
            out of range (named in PEFT's spelling), and as :func:`kappa_lora_targets`.
    """
    policy = _peft_policy(top_p, num_modules, threshold, param_budget)
    targets = kappa_lora_targets(
        model, max_dim_size_to_analyze=max_dim_size_to_analyze, moe_param_suffixes=moe_param_suffixes,
        show_progress=show_progress, table=table, cache=cache, recompute=recompute, include=include,
        exclude=exclude, aggregate=aggregate,
    )
    mods = [t for t in targets if t.kind == "module"]
    prms = [t for t in targets if t.kind == "parameter"]
    if policy is not None and policy.name == "param_budget":
        chosen = set(policy.apply(_targets_table(targets)) if targets else [])
        target_modules = [t.name for t in mods if t.name in chosen]
        target_parameters = [t.name for t in prms if t.name in chosen]
    else:
        target_modules = _pick(mods, policy, top_p)
        target_parameters = _pick(prms, policy, top_p)
    _warn_collisions(model, target_modules, target_parameters)
    return {"target_modules": target_modules, "target_parameters": target_parameters or None}


def _warn_collisions(model: nn.Module, modules: List[str], parameters: List[str]) -> Tuple[Dict, Dict]:
    mod_hits = _collisions(modules, (k for k, _ in model.named_modules()))
    par_hits = _collisions(parameters, _param_keys(model))
    for name, others in {**mod_hits, **par_hits}.items():
        logger.warning("LoRA target %r also matches %s in PEFT's list matching (a key ending in '.%s'); "
                       "get_kappa_lora_config passes an exact regex for target_modules in that case",
                       name, others[:3], name)
    return mod_hits, par_hits


# -- the original kappaTune one-liners -----------------------------------------------------------
def get_kappa_lora_config(
    model: nn.Module,
    num_modules_to_adapt: int = 20,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Optional[Union[List[str], str]] = None,
    task_type: Any = "CAUSAL_LM",
    *,
    max_dim_size_to_analyze: Optional[int] = DEFAULT_MAX_DIM,
    moe_param_suffixes: Optional[Tuple[str, ...]] = None,
    show_progress: bool = True,
    table: Optional[KappaTable] = None,
    cache: CacheArg = True,
    recompute: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    **lora_kwargs: Any,
):
    """A ``peft.LoraConfig`` with LoRA on the ``num_modules_to_adapt`` lowest-κ targets.

    Modules and fused expert parameters are ranked together by κ and the budget takes the
    lowest, in κ order (the original kappaTune sliced an unordered set, so its budget could drop
    the best-conditioned modules). Chosen modules go to ``target_modules`` (as a list, or as an
    exact regex when a list entry would also match another module), expert stacks to
    ``target_parameters``.

    ``target_modules`` given → no κ selection, that list is used (as in the original).
    ``lora_kwargs`` go to ``LoraConfig`` (e.g. ``bias``, ``use_dora``); the keyword-only
    arguments are those of :func:`kappa_lora_targets`.

    Args:
        model (nn.Module): the (possibly 4-bit / 8-bit quantized) base model.
        num_modules_to_adapt (int, optional): how many targets, modules and expert stacks ranked
            together, lowest κ first (all of them when there are fewer). Default: ``20``.
        lora_rank (int, optional): ``LoraConfig``'s ``r``. Default: ``16``.
        lora_alpha (int, optional): ``LoraConfig``'s ``lora_alpha`` (the update is scaled by
            :math:`\\alpha / r`). Default: ``32``.
        lora_dropout (float, optional): ``LoraConfig``'s ``lora_dropout``. Default: ``0.05``.
        target_modules (List[str] or str, optional): explicit targets, used as they are (no κ
            selection). Default: ``None`` (chosen by κ).
        task_type (str or peft.TaskType, optional): ``LoraConfig``'s ``task_type``. Default:
            ``"CAUSAL_LM"``.
        max_dim_size_to_analyze (int, optional): as :func:`kappa_lora_targets`. Default:
            :data:`~kappatune.refs.DEFAULT_MAX_DIM` (16384).
        moe_param_suffixes (Tuple[str, ...], optional): as :func:`kappa_lora_targets`. Default:
            ``None``.
        show_progress (bool, optional): a progress bar during the scan. Default: ``True``.
        table (KappaTable, optional): κ from an earlier scan instead of scanning. Default: ``None``.
        cache (bool, None, str, PathLike or KappaCache, optional): the κ cache. Default: ``True``.
        recompute (bool, optional): ignore cached κ values. Default: ``False``.
        include (None, str or sequence of str, optional): regexes a target must match. Default:
            ``None``.
        exclude (None, str or sequence of str, optional): regexes that leave a target out. Default:
            ``None``.
        **lora_kwargs: passed to ``LoraConfig`` (a ``target_parameters`` given here is used as is,
            like ``target_modules``).

    Raises:
        ValueError: ``num_modules_to_adapt`` not an int >= 1, or no LoRA target in the model.

    Example::

        >>> config = get_kappa_lora_config(model, num_modules_to_adapt=20, lora_rank=16)
        >>> model = peft.get_peft_model(model, config)
    """
    from peft import LoraConfig

    policy = SelectionPolicy.resolve(spelling={"num_tensors": "num_modules_to_adapt="}, num_tensors=num_modules_to_adapt)
    target_parameters = lora_kwargs.pop("target_parameters", None)
    if target_modules is None and target_parameters is None:
        targets = kappa_lora_targets(
            model, max_dim_size_to_analyze=max_dim_size_to_analyze, moe_param_suffixes=moe_param_suffixes,
            show_progress=show_progress, table=table, cache=cache, recompute=recompute, include=include,
            exclude=exclude,
        )
        if not targets:
            raise ValueError(
                f"no LoRA target found in {type(model).__name__}: no nn.Linear / Conv1D module or fused expert "
                f"parameter passed max_dim_size_to_analyze={max_dim_size_to_analyze}, include={include!r}, "
                f"exclude={exclude!r}"
            )
        if num_modules_to_adapt > len(targets):
            logger.warning("num_modules_to_adapt=%d exceeds the %d candidate targets: adapting all of them",
                           num_modules_to_adapt, len(targets))
            policy = SelectionPolicy(num_tensors=len(targets))
        taken = set(policy.apply(_targets_table(targets)))  # modules and expert stacks ranked together
        chosen = [t for t in targets if t.name in taken]
        mods = [t.name for t in chosen if t.kind == "module"]
        prms = [t.name for t in chosen if t.kind == "parameter"]
        logger.info("κ-selected LoRA targets (lowest κ first): %s",
                    ", ".join(f"{t.name} (κ={t.kappa:.4g})" for t in chosen))
        mod_hits, _ = _warn_collisions(model, mods, prms)
        target_modules = (("^(?:" + "|".join(re.escape(m) for m in mods) + ")$") if mod_hits else mods) or None
        target_parameters = prms or None
    if target_parameters is not None:  # (older PEFT has no target_parameters)
        lora_kwargs["target_parameters"] = target_parameters
    return LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=target_modules, task_type=task_type, **lora_kwargs)


def get_kappatune_lora_model(model: nn.Module, num_modules_to_adapt: int = 20, **lora_kwargs: Any):
    """``peft.get_peft_model(model, get_kappa_lora_config(model, num_modules_to_adapt, **lora_kwargs))``.

    For a 4-bit / 8-bit base (QLoRA), call ``peft.prepare_model_for_kbit_training(model)`` first
    as usual; κ is computed on the dequantized weights either way.

    Args:
        model (nn.Module): the base model, wrapped in place by PEFT.
        num_modules_to_adapt (int, optional): how many lowest-κ targets get LoRA, as
            :func:`get_kappa_lora_config`. Default: ``20``.
        **lora_kwargs: the other arguments of :func:`get_kappa_lora_config`.

    Example::

        >>> model = get_kappatune_lora_model(model, num_modules_to_adapt=20, lora_rank=16)
        >>> model.print_trainable_parameters()
    """
    from peft import get_peft_model

    config = get_kappa_lora_config(model, num_modules_to_adapt, **lora_kwargs)
    return get_peft_model(model, config)
