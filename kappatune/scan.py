"""Scan a model's weights for their condition numbers.

:func:`scan` walks ``model.named_parameters()`` (tied weights once), keeps the eligible tensors
(``min_ndim``, ``max_dim``, ``include`` / ``exclude`` regexes), looks each one up in the
:class:`~kappatune.cache.KappaCache` by content digest, computes κ for the rest
(:mod:`kappatune.kappa`) and returns a :class:`~kappatune.selection.KappaTable`.

Under an initialised ``torch.distributed`` process group the κ computations are sharded across
ranks (each rank analyses its share, results are gathered), every rank ends with rank 0's identical
table, and only rank 0 writes the cache. Without a process group nothing of this happens.

Example::

    >>> table = kappatune.scan(model, max_dim=16384)
    >>> table[:3]           # the three lowest-κ tensors
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .cache import KappaCache, tensor_digest
from .kappa import KappaResult, kappa_of
from .selection import KappaEntry, KappaTable, compile_patterns

__all__ = ["scan", "scan_refs", "TensorRef", "model_refs", "resolve_cache"]

logger = logging.getLogger(__name__)

Patterns = Union[None, str, Sequence[str]]
CacheArg = Union[bool, None, str, "KappaCache", Any]


@dataclass
class TensorRef:
    """A tensor to analyse, loaded on demand.

    ``load()`` returns the tensor whose κ is wanted (for a quantized weight: its dequantized
    matrix); ``digest()`` identifies its stored content for the cache (default: the digest of
    ``load()``). ``layout`` is ``"auto"``, ``"matrix"``, ``"flatten"`` or ``"stack"``.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor]
    layout: str = "auto"
    digest: Optional[Callable[[], str]] = None
    floating: bool = True


def resolve_cache(cache: CacheArg) -> Optional[KappaCache]:
    """``True`` → the default cache; ``False``/``None`` → no cache; a path → ``KappaCache(path)``."""
    if cache is True:
        return KappaCache()
    if cache is False or cache is None:
        return None
    if isinstance(cache, KappaCache):
        return cache
    if isinstance(cache, (str, bytes)) or hasattr(cache, "__fspath__"):
        return KappaCache(cache)
    raise TypeError(f"cache must be True, False/None, a path or a KappaCache, got {type(cache).__name__}")


def _owner_modules(model: nn.Module) -> Dict[int, nn.Module]:
    owners: Dict[int, nn.Module] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), mod)
    return owners


def _param_layout(p: torch.Tensor, owner: Optional[nn.Module]) -> str:
    if isinstance(owner, nn.modules.conv._ConvNd):
        return "flatten"
    return "auto"


def model_refs(model: nn.Module) -> List[TensorRef]:
    """One :class:`TensorRef` per distinct parameter of ``model`` (tied weights once).

    Convolution kernels get the ``"flatten"`` layout; other 3-D parameters are stacks of matrices.
    Parameters of quantized layers (bitsandbytes) are dequantized by :mod:`kappatune.quant`.
    """
    from . import quant

    owners = _owner_modules(model)
    refs = []
    for name, p in model.named_parameters():
        owner = owners.get(id(p))
        qref = quant.quantized_ref(name, p, owner)
        if qref is not None:
            refs.append(qref)
            continue
        refs.append(TensorRef(
            name=name, shape=tuple(p.shape), dtype=str(p.dtype).replace("torch.", ""),
            load=(lambda p=p: p.detach()), layout=_param_layout(p, owner),
            floating=p.is_floating_point(),
        ))
    return refs


def _matrix_dims(shape: Tuple[int, ...], layout: str) -> Tuple[int, int]:
    if layout == "stack" or (layout == "auto" and len(shape) == 3):
        return shape[1], shape[2]
    if layout == "flatten" or len(shape) > 2:
        return shape[0], math.prod(shape[1:])
    return shape[0], shape[1]


def _skip_reason(ref: TensorRef, min_ndim: int, max_dim: Optional[int], inc, exc) -> Optional[str]:
    if inc and not any(r.search(ref.name) for r in inc):
        return "not included"
    if any(r.search(ref.name) for r in exc):
        return "excluded"
    if len(ref.shape) < max(min_ndim, 2):
        return f"ndim<{max(min_ndim, 2)}"
    if not ref.floating:
        return "not floating point"
    if math.prod(ref.shape) == 0:
        return "empty"
    if max_dim is not None and max(_matrix_dims(ref.shape, ref.layout)) > max_dim:
        return "max_dim"
    return None


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="tensor", leave=False)
        except ImportError:  # tqdm is optional
            pass
    return None


def _dist_info() -> Tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ws = torch.distributed.get_world_size()
        return ws > 1, torch.distributed.get_rank(), ws
    return False, 0, 1


def _cost(ref: TensorRef) -> int:
    m, n = _matrix_dims(ref.shape, ref.layout)
    b = ref.shape[0] if (ref.layout == "stack" or (ref.layout == "auto" and len(ref.shape) == 3)) else 1
    return b * m * n * min(m, n)


def _shard(names_costs: List[Tuple[str, int]], world: int) -> Dict[str, int]:
    """Longest-processing-time assignment of work to ranks; deterministic (ties by name)."""
    load = [0] * world
    owner = {}
    for name, cost in sorted(names_costs, key=lambda x: (-x[1], x[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += cost
    return owner


def _result_from_cache(e: dict) -> KappaResult:
    pm = e.get("per_matrix")
    return KappaResult(e["kappa"], e["sigma_max"], e["sigma_min"], e["layout"],
                       None if pm is None else tuple(pm))


def _aggregate(res: KappaResult, aggregate: str) -> float:
    if res.per_matrix is None:
        return res.kappa
    return max(res.per_matrix) if aggregate == "max" else sum(res.per_matrix) / len(res.per_matrix)


def scan(
    model: Union[nn.Module, Mapping[str, torch.Tensor]],
    *,
    min_ndim: int = 2,
    max_dim: Optional[int] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    cache: CacheArg = True,
    recompute: bool = False,
    aggregate: str = "mean",
    progress: bool = True,
) -> KappaTable:
    """κ of every eligible weight of ``model``, as a :class:`KappaTable` (lowest κ first).

    Args:
        model: an ``nn.Module`` (its ``named_parameters()``, tied weights once) or a mapping of
            names to tensors (a state dict).
        min_ndim: tensors with fewer dimensions are skipped (default 2: biases and norms).
        max_dim: skip tensors with a matrix side longer than this (e.g. ``16384`` skips large
            embeddings, the costliest and usually least wanted).
        include / exclude: regexes (``re.search``) on parameter names.
        cache: ``True`` (default) uses :func:`~kappatune.cache.default_cache_dir`; a path or a
            :class:`KappaCache` uses that; ``False``/``None`` disables caching.
        recompute: ignore cached values (fresh values are still written to the cache).
        aggregate: ``"mean"`` or ``"max"`` over the matrices of a stacked 3-D parameter.
        progress: show a ``tqdm`` progress bar (if ``tqdm`` is installed).
    """
    if isinstance(model, nn.Module):
        from .distributed import check_wrapped_model

        check_wrapped_model(model, scanning=True)  # an FSDP-sharded model holds no whole matrices
        refs = model_refs(model)
    elif isinstance(model, Mapping):
        refs = [TensorRef(name=k, shape=tuple(v.shape), dtype=str(v.dtype).replace("torch.", ""),
                          load=(lambda v=v: v.detach()), floating=v.is_floating_point())
                for k, v in model.items()]
    else:
        raise TypeError(f"scan expects an nn.Module or a mapping of name -> tensor, got {type(model).__name__}")
    return scan_refs(refs, min_ndim=min_ndim, max_dim=max_dim, include=include, exclude=exclude,
                     cache=cache, recompute=recompute, aggregate=aggregate, progress=progress)


def scan_refs(
    refs: Iterable[TensorRef],
    *,
    min_ndim: int = 2,
    max_dim: Optional[int] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    cache: CacheArg = True,
    recompute: bool = False,
    aggregate: str = "mean",
    progress: bool = True,
) -> KappaTable:
    """:func:`scan` over :class:`TensorRef` objects (used for checkpoints on disk)."""
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 1:
        raise ValueError(f"min_ndim must be an int >= 1, got {min_ndim!r}")
    if max_dim is not None and (isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1):
        raise ValueError(f"max_dim must be None or an int >= 1, got {max_dim!r}")
    if aggregate not in ("mean", "max"):
        raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    store = resolve_cache(cache)
    distributed, rank, world = _dist_info()
    t0 = time.perf_counter()

    eligible: List[TensorRef] = []
    skipped: Dict[str, str] = {}
    seen = set()
    for ref in refs:
        if ref.name in seen:
            raise ValueError(f"tensor name {ref.name!r} appears twice")
        seen.add(ref.name)
        reason = _skip_reason(ref, min_ndim, max_dim, inc, exc)
        if reason:
            skipped[ref.name] = reason
        else:
            eligible.append(ref)

    results: Dict[str, KappaResult] = {}
    digests: Dict[str, Optional[str]] = {}
    todo: List[TensorRef] = []
    n_cached = 0
    bar = _progress(len(eligible), progress and rank == 0, "κ scan")
    try:
        for ref in eligible:
            tensor = None
            digest = None
            if store is not None:
                if ref.digest is not None:
                    digest = ref.digest()
                else:
                    tensor = ref.load()
                    digest = tensor_digest(tensor)
                digests[ref.name] = digest
                hit = None if recompute else store.get(KappaCache.key(digest, _layout_of(ref)))
                if hit is not None:
                    results[ref.name] = _result_from_cache(hit)
                    n_cached += 1
                    if bar is not None:
                        bar.update(1)
                    continue
            if distributed:
                todo.append(ref)
                continue
            results[ref.name] = _compute(ref, tensor)
            del tensor
            if bar is not None:
                bar.update(1)
        if distributed:
            _distributed_compute(todo, results, rank, world, bar)
    finally:
        if bar is not None:
            bar.close()

    n_computed = len(eligible) - n_cached
    if store is not None:
        for ref in eligible:
            res = results[ref.name]
            key = KappaCache.key(digests[ref.name], res.layout)  # type: ignore[arg-type]
            if key not in store or recompute:
                store.put(key, kappa=res.kappa, sigma_max=res.sigma_max, sigma_min=res.sigma_min,
                          shape=ref.shape, dtype=ref.dtype, layout=res.layout,
                          per_matrix=res.per_matrix, name=ref.name)
        if rank == 0:
            store.save()

    entries = [
        KappaEntry(name=ref.name, kappa=_aggregate(results[ref.name], aggregate), shape=tuple(ref.shape),
                   numel=math.prod(ref.shape), dtype=ref.dtype, layout=results[ref.name].layout,
                   sigma_max=results[ref.name].sigma_max, sigma_min=results[ref.name].sigma_min,
                   per_matrix=results[ref.name].per_matrix, digest=digests.get(ref.name))
        for ref in eligible
    ]
    table = KappaTable(entries, skipped)
    if distributed:
        table = _broadcast_table(table)

    reasons = Counter(skipped.values())
    logger.info(
        "κ scan: %d tensors analysed (%d from cache, %d computed%s) in %.2fs; %d skipped%s",
        len(eligible), n_cached, n_computed, f" over {world} ranks" if distributed else "",
        time.perf_counter() - t0, len(skipped),
        (" (" + ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items())) + ")") if reasons else "",
    )
    return table


def _layout_of(ref: TensorRef) -> str:
    from .kappa import resolve_layout

    return resolve_layout(tuple(ref.shape), ref.layout, name=ref.name)  # type: ignore[arg-type]


def _compute(ref: TensorRef, tensor: Optional[torch.Tensor]) -> KappaResult:
    if tensor is None:
        tensor = ref.load()
    if tensor.device.type == "meta":
        raise ValueError(f"{ref.name}: the tensor is on the meta device (no data); load real weights before scanning")
    return kappa_of(tensor, name=ref.name, layout=ref.layout)  # type: ignore[arg-type]


def _distributed_compute(todo: List[TensorRef], results: Dict[str, KappaResult], rank: int, world: int, bar) -> None:
    import torch.distributed as dist

    by_name = {r.name: r for r in todo}
    mine_missing = [(r.name, _cost(r)) for r in todo]
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, mine_missing)
    union: Dict[str, int] = {}
    for part in gathered:
        for name, cost in part:
            union[name] = cost
    owner = _shard(list(union.items()), world)
    computed: Dict[str, Tuple] = {}
    for name in sorted(n for n, r in owner.items() if r == rank):
        if name in results:  # cached here, missing on another rank
            res = results[name]
        else:
            if name not in by_name:
                raise RuntimeError(f"rank {rank} was assigned {name!r}, which it does not have; every rank "
                                   "must scan the same set of tensors (scan before sharding the model with FSDP)")
            res = _compute(by_name[name], None)
        computed[name] = (res.kappa, res.sigma_max, res.sigma_min, res.layout, res.per_matrix)
        if bar is not None:
            bar.update(1)
    gathered = [None] * world
    dist.all_gather_object(gathered, computed)
    for part in gathered:
        for name, vals in part.items():
            results.setdefault(name, KappaResult(*vals))
    missing = [r.name for r in todo if r.name not in results]
    if missing:
        raise RuntimeError(f"distributed κ scan lost results for {missing[:3]}")
    _dist_info_last.update(computed_here=len(computed))


_dist_info_last: Dict[str, int] = {}


def _broadcast_table(table: KappaTable) -> KappaTable:
    import torch.distributed as dist

    obj = [table.to_dict()]
    dist.broadcast_object_list(obj, src=0)
    dist.barrier()
    return KappaTable.from_dict(obj[0])
