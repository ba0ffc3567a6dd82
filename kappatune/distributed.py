"""kappatune under ``torch.distributed``: DDP, FSDP and the cross-rank selection check.

kappatune has no launcher of its own: it works inside whatever ``torchrun`` / accelerate /
DDP / FSDP set up. Under an initialised process group :func:`kappatune.scan` shards the κ
computation across ranks and hands every rank rank 0's identical table; this module holds the
checks that make data-parallel training with a κ selection safe:

* :func:`check_same_selection` — every rank must train exactly the same tensors (in the same
  order). A mismatch (e.g. each rank read its own, different κ cache) would desynchronise the
  replicas; it is detected with one small collective and raised on **every** rank, so no rank is
  left waiting in a later collective.
* :func:`check_wrapped_model` — refuses what cannot work with per-tensor selection: scanning an
  FSDP-sharded model (each rank holds only shards; FSDP2 would even hang in a collective), and
  FSDP1 with ``use_orig_params=False`` (parameters are fused into flat parameters).
* :func:`check_ddp_selection` — a ``DistributedDataParallel`` built *before* the freeze registers
  every then-trainable tensor in its gradient reducer; freezing some afterwards makes DDP wait
  for gradients that never come (an error at the next iteration, and un-averaged gradients in the
  step before). It is refused with the fix, unless DDP was built with
  ``find_unused_parameters=True`` or ``static_graph=True`` (then it only costs bandwidth).

The recommended order (scan and freeze the *unwrapped* model, then wrap, then build the
optimizer from the same selection)::

    >>> table = kappatune.scan(model, max_dim=16384)      # sharded over the ranks, same table everywhere
    >>> names = table.select(top_fraction=0.1)
    >>> kappatune.freeze_all_but(model, names)
    >>> model = DDP(model)        # or FSDP(model, use_orig_params=True) / fully_shard(model)
    >>> opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, names=names, table=table, lr=2e-5)

Without an initialised process group (or with a world of one) every check here is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["unwrap_model", "check_same_selection"]

logger = logging.getLogger(__name__)

#: The recommended flow for sharded models, quoted by the error messages.
SCAN_BEFORE_WRAP = (
    "table = kappatune.scan(model); names = table.select(...); kappatune.freeze_all_but(model, names); "
    "model = FSDP(model, use_orig_params=True) (or fully_shard(model)); "
    "opt = KappaTuneOptimizer(model, torch.optim.AdamW, names=names, table=table, ...)"
)


def is_distributed(group: Any = None) -> bool:
    """``True`` when ``torch.distributed`` is initialised and ``group`` (default: the world) has > 1 rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(group) > 1


def rank_and_world(group: Any = None) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without an initialised process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _fingerprint(names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _describe_mismatch(per_rank: List[List[str]], ordered: bool) -> str:
    ref = per_rank[0]
    lines = []
    for r, names in enumerate(per_rank[1:], start=1):
        if names == ref or (not ordered and sorted(names) == sorted(ref)):
            continue
        only_ref = [n for n in ref if n not in set(names)]
        only_here = [n for n in names if n not in set(ref)]
        if not only_ref and not only_here:
            i = next(i for i, (a, b) in enumerate(zip(ref, names)) if a != b)
            lines.append(f"rank {r} selected the same {len(names)} tensors as rank 0 in another order "
                         f"(position {i}: rank 0 has {ref[i]!r}, rank {r} has {names[i]!r})")
            continue
        i = next((i for i, (a, b) in enumerate(zip(ref, names)) if a != b), min(len(ref), len(names)))
        first = (f"first difference at position {i}: rank 0 has {ref[i] if i < len(ref) else '<end>'!r}, "
                 f"rank {r} has {names[i] if i < len(names) else '<end>'!r}")
        lines.append(f"rank {r} selected {len(names)} tensors, rank 0 selected {len(ref)}; {first}"
                     + (f"; only on rank 0: {only_ref[:3]}" if only_ref else "")
                     + (f"; only on rank {r}: {only_here[:3]}" if only_here else ""))
    return "; ".join(lines)


def check_same_selection(names: Iterable[str], *, group: Any = None, ordered: bool = True) -> None:
    """Raise :class:`ValueError` on every rank unless all ranks of ``group`` selected the same tensors.

    Data-parallel training (DDP, FSDP) needs every replica to train exactly the same tensors; a rank
    that trains others (a different κ table, cache or selection policy on that rank) silently
    desynchronises the model or breaks gradient reduction. This is a collective: call it on every
    rank of ``group`` (default: the world). It exchanges one fingerprint (SHA-256 of the names) per
    rank; only on a mismatch are the lists themselves gathered, to name the ranks and the first
    differing tensor. Every rank sees the same gathered data, so every rank raises (no rank is left
    blocked in a later collective). Without an initialised process group it does nothing.

    Args:
        names (Iterable[str]): the selected parameter names, in the order the optimizer holds them.
        group (torch.distributed.ProcessGroup, optional): the process group. Default: ``None`` (the
            default group, the world).
        ordered (bool, optional): also require the same order; with ``False`` only the set must
            match. Default: ``True``.

    Raises:
        TypeError: ``names`` a single string, or not all strings.
        ValueError: ranks that selected different tensors, naming them and the first difference.

    Example::

        >>> check_same_selection(opt.selected)      # after building the optimizer on every rank
    """
    if isinstance(names, str):
        raise TypeError("names must be a list of parameter names, not a single string")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"names must be strings, got {type(bad[0]).__name__}")
    if not is_distributed(group):
        return
    import torch.distributed as dist

    world = dist.get_world_size(group)
    key = names if ordered else sorted(names)
    mine = (len(key), _fingerprint(key))
    prints: List[Any] = [None] * world
    dist.all_gather_object(prints, mine, group=group)
    if all(p == prints[0] for p in prints):
        return
    per_rank: List[Any] = [None] * world
    dist.all_gather_object(per_rank, names, group=group)
    differing = [r for r in range(world) if prints[r] != prints[0]]
    raise ValueError(
        f"the tensors selected for training differ between ranks (ranks {differing} differ from rank 0): "
        + _describe_mismatch(per_rank, ordered)
        + ". Every data-parallel rank must train the same tensors. Compute the selection from one κ table "
        "on every rank: kappatune.scan(model) under the process group gives every rank rank 0's table; a "
        "table= or names= passed by hand must have the same content on every rank (not come from each "
        "rank's own cache file)."
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Parameter names of a :class:`KappaTuneOptimizer` are those of the unwrapped module.

    Args:
        model (nn.Module): the model, wrapped any number of times (or not at all: returned as is).
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
    return model


def sharding_kind(model: nn.Module) -> Optional[str]:
    """``"fsdp1"`` (``FullyShardedDataParallel`` inside), ``"fsdp2"`` (``fully_shard`` / DTensor
    parameters) or ``None`` for a model whose parameters are whole tensors."""
    # A model can only be sharded if FSDP / DTensor were imported: look them up in sys.modules
    # instead of importing them (importing torch.distributed.fsdp costs about a second).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = sys.modules.get("torch.distributed.tensor")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    fsdp2 = getattr(fsdp, "FSDPModule", None)
    dtensor_cls = getattr(dtensor, "DTensor", None)
    if fsdp1 is None and fsdp2 is None and dtensor_cls is None:
        return None
    for m in model.modules():
        if fsdp1 is not None and isinstance(m, fsdp1):
            return "fsdp1"
        if fsdp2 is not None and isinstance(m, fsdp2):
            return "fsdp2"
    if dtensor_cls is not None and any(isinstance(p, dtensor_cls) for p in model.parameters()):
        return "fsdp2"
    return None


def check_wrapped_model(model: nn.Module, *, scanning: bool) -> None:
    """Raise :class:`ValueError` for a wrapped model that per-tensor κ selection cannot handle.

    * FSDP1 with ``use_orig_params=False``: the weights live in fused flat parameters, so there
      are no per-tensor parameters to select, freeze or name. Wrap with ``use_orig_params=True``.
    * ``scanning=True`` (the caller is about to compute κ from ``model``) on an FSDP-sharded model:
      FSDP1 holds a flat 1-D shard of each weight per rank and FSDP2 DTensor shards whose
      gathering is a collective; κ needs whole matrices. Scan before wrapping and pass the result
      (see :data:`SCAN_BEFORE_WRAP`).

    Args:
        model: the model as given by the user (DDP/FSDP wrappers included).
        scanning: ``True`` when κ will be computed from this model's parameters.
    """
    kind = sharding_kind(model)
    if kind is None:
        return
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

        flat = [m for m in model.modules() if isinstance(m, FSDP1) and not getattr(m, "_use_orig_params", True)]
        if flat:
            raise ValueError(
                "the model is wrapped in FullyShardedDataParallel with use_orig_params=False: "
                "its weights are fused into flat parameters, so single tensors cannot be selected, frozen or "
                "trained by name. Wrap with FullyShardedDataParallel(model, use_orig_params=True, ...) after "
                "freezing, i.e. " + SCAN_BEFORE_WRAP
            )
    if scanning:
        what = ("FullyShardedDataParallel (FSDP1): each rank holds a flat 1-D shard of every weight"
                if kind == "fsdp1" else
                "fully_shard (FSDP2): its parameters are DTensor shards and gathering them is a collective")
        raise ValueError(
            f"cannot compute κ from a model sharded by {what}, while κ needs whole matrices. Scan the model "
            "before wrapping it and give the optimizer the result: " + SCAN_BEFORE_WRAP
        )


def _ddp_of(model: nn.Module) -> Optional[nn.Module]:
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)  # torch.compile around DDP
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def check_ddp_selection(model: nn.Module, trained: Iterable[torch.Tensor]) -> None:
    """Check, *before* freezing, that an existing DDP wrapper agrees with what will be trained.

    ``DistributedDataParallel`` registers the parameters that require grad **when it is built**.
    Call this with the parameters about to be trained, before ``requires_grad`` is changed:

    * a registered parameter that will be frozen: DDP would wait for its gradient forever — the
      next forward raises "Expected to have finished reduction in the prior iteration", and the
      buckets holding it are never all-reduced in the step before, so the replicas diverge. This
      raises :class:`ValueError` with the fix, unless DDP was built with
      ``find_unused_parameters=True`` or ``static_graph=True``, which cope (with a warning: the
      frozen tensors are still all-reduced every step, as zeros);
    * a parameter to train that DDP did not register (frozen when DDP was built): its gradient
      would never be averaged; always a :class:`ValueError`.

    Does nothing if ``model`` is not (a ``torch.compile`` of) a ``DistributedDataParallel``.
    """
    ddp = _ddp_of(model)
    if ddp is None:
        return
    keep = {id(p) for p in trained}
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    registered_frozen, unregistered_trained = [], []
    seen = set()
    for name, p in ddp.module.named_parameters():
        if id(p) in seen or name in ignored:
            continue
        seen.add(id(p))
        if p.requires_grad and id(p) not in keep:
            registered_frozen.append(name)
        elif not p.requires_grad and id(p) in keep:
            unregistered_trained.append(name)
    fix = ("build the optimizer before wrapping (opt = KappaTuneOptimizer(model, ...); model = DDP(model)), or "
           "freeze first and wrap afterwards (kappatune.freeze_all_but(model, names); model = DDP(model); "
           "KappaTuneOptimizer(model, ..., names=names, table=table))")
    if unregistered_trained:
        raise ValueError(
            f"{len(unregistered_trained)} tensor(s) selected for training were frozen when "
            f"DistributedDataParallel was built, e.g. {unregistered_trained[:3]}: DDP never all-reduces their "
            f"gradients, so the ranks would drift apart. Fix: {fix}."
        )
    if not registered_frozen:
        return
    if getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False):
        logger.warning(
            "%d tensor(s) are frozen after DistributedDataParallel registered them (e.g. %s); it copes "
            "(find_unused_parameters/static_graph) but still all-reduces their zero gradients every step. "
            "Freeze before wrapping to save that bandwidth.", len(registered_frozen), registered_frozen[:3])
        return
    raise ValueError(
        f"this DistributedDataParallel model was built while {len(registered_frozen)} tensor(s) that the κ "
        f"selection freezes still required grad, e.g. {registered_frozen[:3]}. DDP's reducer waits for their "
        "gradients: the first step would all-reduce only part of the gradients and the next forward fails "
        f"with 'Expected to have finished reduction in the prior iteration'. Fix: {fix}; or wrap with "
        "DDP(model, find_unused_parameters=True) (slower: frozen tensors are still all-reduced)."
    )
