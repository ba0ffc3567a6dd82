"""Scan a model's weights for their condition numbers (or Spectrum's SNR).

:func:`scan` (a model or a state dict) and :func:`scan_refs` (any :class:`~kappatune.refs.TensorRef`,
e.g. a checkpoint's) run one short pipeline, each step a function of its own:

1. :func:`filter_refs` — keep the eligible tensors (name filter, ``min_ndim``, ``max_dim``, floating
   point, non-empty) and record why each other one was skipped;
2. :func:`lookup` — digest each tensor's content and take its κ from the
   :class:`~kappatune.cache.KappaCache` where an entry exists;
3. :func:`compute_local` / :func:`compute_sharded` — compute κ (:mod:`kappatune.kappa`) for the rest,
   in this process or sharded over the ranks of a ``torch.distributed`` process group;
4. :func:`store` — record the new values in the cache (rank 0 writes the file);
5. :func:`build_table` — the :class:`~kappatune.table.KappaTable`, lowest κ first.

``score="snr"`` runs the same pipeline for Spectrum's signal-to-noise ratio
(:func:`kappatune.kappa.snr_of`, from every singular value): the same filters, digests, cache
(under SNR keys of their own, :meth:`~kappatune.cache.KappaCache.key`) and sharding, and a table
ordered highest SNR first, which every selection policy then walks best first. The κ pipeline is
unchanged by it.

Under an initialised process group every rank ends with rank 0's identical table. Without one,
nothing distributed happens.

Example::

    >>> table = kappatune.scan(model)
    >>> table[:3]           # the three lowest-κ tensors
    >>> snr = kappatune.scan(model, score="snr")
    >>> snr.select(top_fraction=0.25, group_by="kind")   # Spectrum: the top quarter of each kind
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .cache import KappaCache, tensor_digest
from .distributed import rank_and_world
from ._numbers import aggregate_values
from .kappa import SnrResult, kappa_of, snr_of
from .refs import DEFAULT_MAX_DIM, Eligibility, NameFilter, Patterns, TensorRef, default_layout, dtype_name, matrix_dims, num_matrices
from .table import SCORES, KappaEntry, KappaTable

__all__ = ["scan", "scan_refs", "model_refs", "state_dict_refs", "CacheArg"]

logger = logging.getLogger(__name__)

#: What ``cache=`` accepts everywhere in kappatune.
CacheArg = Union[bool, None, str, bytes, "os.PathLike[str]", KappaCache]
#: A result of step 3: κ (a :class:`~kappatune.table.KappaEntry`) or SNR (:class:`~kappatune.kappa.SnrResult`).
Result = Union[KappaEntry, SnrResult]


def resolve_cache(cache: CacheArg) -> Optional[KappaCache]:
    """The :class:`KappaCache` that a ``cache=`` argument names.

    Args:
        cache: ``True`` → the default cache (:func:`~kappatune.cache.default_cache_dir`);
            ``False``/``None`` → no cache; a path (``str``, ``bytes`` or ``os.PathLike``) →
            ``KappaCache(path)``; a :class:`KappaCache` → itself.

    Raises:
        TypeError: anything else.
    """
    if cache is True:
        return KappaCache()
    if cache is False or cache is None:
        return None
    if isinstance(cache, KappaCache):
        return cache
    if isinstance(cache, (str, bytes)) or hasattr(cache, "__fspath__"):
        return KappaCache(os.fsdecode(cache))
    raise TypeError(f"cache must be True, False/None, a path or a KappaCache, got {type(cache).__name__}")


# -- refs of a model or a state dict ---------------------------------------------------------
def _owner_modules(model: nn.Module) -> Dict[int, nn.Module]:
    owners: Dict[int, nn.Module] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), mod)
    return owners


def _tensor_ref(name: str, t: torch.Tensor, conv: Optional[bool] = None) -> TensorRef:
    return TensorRef(name=name, shape=tuple(t.shape), dtype=dtype_name(t.dtype), load=(lambda t=t: t.detach()),
                     layout=default_layout(name, tuple(t.shape), conv=conv), floating=t.is_floating_point())


def model_refs(model: nn.Module) -> List[TensorRef]:
    """One :class:`TensorRef` per distinct parameter of ``model`` (tied weights once).

    Layouts follow :func:`kappatune.refs.default_layout` (convolution kernels are flattened).
    Parameters of quantized layers (bitsandbytes) are dequantized by :mod:`kappatune.quant`.

    Args:
        model (nn.Module): the model; its ``named_parameters()`` give the names.
    """
    from . import quant

    owners = _owner_modules(model)
    refs = []
    for name, p in model.named_parameters():
        owner = owners.get(id(p))
        qref = quant.quantized_ref(name, p, owner)
        if qref is not None:
            refs.append(qref)
        else:
            refs.append(_tensor_ref(name, p, conv=isinstance(owner, nn.modules.conv._ConvNd)))
    return refs


def state_dict_refs(state_dict: Mapping[str, torch.Tensor]) -> List[TensorRef]:
    """One :class:`TensorRef` per tensor of a state dict (layouts by name, as for a checkpoint).

    Args:
        state_dict (Mapping[str, Tensor]): name → tensor, e.g. ``model.state_dict()``.

    Raises:
        TypeError: a value that is not a tensor, named.
    """
    refs = []
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        refs.append(_tensor_ref(k, v))
    return refs


# -- 1. filter -------------------------------------------------------------------------------
def filter_refs(refs: Iterable[TensorRef], *, min_ndim: int = 2, max_dim: Optional[int] = DEFAULT_MAX_DIM,
                names: Optional[NameFilter] = None) -> Tuple[List[TensorRef], Dict[str, str]]:
    """Step 1: the eligible refs, and ``name → reason`` for every other one.

    Args:
        refs (Iterable[TensorRef]): the candidates; names must be unique.
        min_ndim (int): fewer dimensions → ``"ndim<k"`` (default 2; at least 2 always applies).
        max_dim (Optional[int]): a matrix side longer than this → ``"max_dim"`` (default 16384).
        names (Optional[NameFilter]): include/exclude patterns (default ``None``: all names).

    Raises:
        ValueError: a name that appears twice, or an invalid argument.
    """
    return Eligibility(min_ndim, max_dim, names).split(refs)


# -- 2. cache lookup -------------------------------------------------------------------------
def load_tensor(ref: TensorRef) -> torch.Tensor:
    """``ref.load()``, refusing a tensor that holds no data (the meta device) with a clear error."""
    t = ref.load()
    if t.device.type == "meta":
        raise ValueError(f"{ref.name}: the tensor is on the meta device (no data); load real weights before "
                         "scanning (e.g. from_pretrained without device_map='meta' / init_empty_weights)")
    return t


def _result_from_entry(e: Mapping[str, Any]) -> KappaEntry:
    pm = e.get("per_matrix")
    shape = tuple(int(d) for d in e["shape"])
    return KappaEntry(name=str(e.get("name") or ""), kappa=float(e["kappa"]), shape=shape, numel=math.prod(shape),
                      dtype=str(e["dtype"]), layout=str(e["layout"]), sigma_max=float(e["sigma_max"]),
                      sigma_min=float(e["sigma_min"]), per_matrix=None if pm is None else tuple(float(v) for v in pm))


def _snr_from_entry(e: Mapping[str, Any]) -> SnrResult:
    pm = e.get("per_matrix")

    def part(x: Any) -> float:
        return math.nan if x is None else float(x)

    return SnrResult(float(e["snr"]), float(e["sigma_max"]), part(e.get("signal")), part(e.get("noise")),
                     part(e.get("threshold")), str(e["layout"]), None if pm is None else tuple(float(v) for v in pm))


def _kappa_fields(res: KappaEntry) -> Dict[str, Any]:
    return dict(kappa=res.kappa, sigma_max=res.sigma_max, sigma_min=res.sigma_min, layout=res.layout,
                per_matrix=res.per_matrix)


def _snr_fields(res: SnrResult) -> Dict[str, Any]:
    return dict(snr=res.snr, sigma_max=res.sigma_max, signal=res.signal, noise=res.noise, threshold=res.threshold,
                layout=res.layout, per_matrix=res.per_matrix)


def _ops(score: str) -> "_ScoreOps":
    if score not in _OPS:
        raise ValueError(f"score must be one of {', '.join(map(repr, _OPS))}, got {score!r}")
    return _OPS[score]


@dataclass
class Looked:
    """One eligible ref after step 2.

    ``cached`` is its cached result (``None``: missing), ``digest`` its content digest (``None``
    without a cache), and ``tensor`` the tensor if it was loaded to be digested, for step 3 to reuse
    (so a missing tensor is read once).
    """

    ref: TensorRef
    digest: Optional[str]
    cached: Optional[Result]
    tensor: Optional[torch.Tensor] = None


def lookup(refs: Iterable[TensorRef], cache: Optional[KappaCache], *, recompute: bool = False,
           score: str = "kappa") -> Iterator[Looked]:
    """Step 2: the cached κ of each ref, by content digest, lazily (one tensor in hand at a time).

    Args:
        refs (Iterable[TensorRef]): eligible refs.
        cache (Optional[KappaCache]): the cache (``None``: every ref is missing, nothing is digested).
        recompute (bool): digest but ignore cached values (default ``False``).
        score (str): ``"kappa"`` (default) or ``"snr"``: which entries to look up (each score has
            keys of its own).
    """
    ops = _ops(score)
    for ref in refs:
        if cache is None:
            yield Looked(ref, None, None)
            continue
        tensor = None
        if ref.digest is not None:
            digest = ref.digest()
        else:
            tensor = load_tensor(ref)
            digest = tensor_digest(tensor)
        hit = None if recompute else cache.get(KappaCache.key(digest, ref.resolved_layout, score), shape=ref.shape,
                                               dtype=ref.dtype)
        if hit is not None:
            yield Looked(ref, digest, ops.from_entry(hit))
        else:
            yield Looked(ref, digest, None, tensor)


# -- 3. compute ------------------------------------------------------------------------------
def _kappa_of(ref: TensorRef, tensor: Optional[torch.Tensor] = None) -> KappaEntry:
    t = tensor if tensor is not None else load_tensor(ref)
    return kappa_of(t, name=ref.name, layout=ref.layout)  # type: ignore[arg-type]


def _snr_of(ref: TensorRef, tensor: Optional[torch.Tensor] = None) -> SnrResult:
    t = tensor if tensor is not None else load_tensor(ref)
    return snr_of(t, name=ref.name, layout=ref.layout)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _ScoreOps:
    """How the pipeline computes and caches one score (:data:`kappatune.table.SCORES`)."""

    result: type       # KappaEntry or SnrResult
    compute: Any       # (ref, tensor or None) -> result
    from_entry: Any    # decoded cache entry -> result
    fields: Any        # result -> fields of KappaCache.put_many


# compute looks the function up when called (so that it can be wrapped, as the tests do with _kappa_of)
_OPS: Dict[str, _ScoreOps] = {
    "kappa": _ScoreOps(KappaEntry, lambda ref, t=None: _kappa_of(ref, t), _result_from_entry, _kappa_fields),
    "snr": _ScoreOps(SnrResult, lambda ref, t=None: _snr_of(ref, t), _snr_from_entry, _snr_fields),
}


def resolve_workers(num_workers: Optional[int] = None) -> int:
    """How many matrices :func:`compute_local` analyses at once.

    ``None`` (default) uses the machine: ``torch.get_num_threads()``, which follows
    ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` and is otherwise the number of cores.
    """
    if num_workers is None:
        return max(1, torch.get_num_threads())
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be None or an int >= 1, got {num_workers!r}")
    return num_workers


@contextlib.contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads and numpy's BLAS (OpenBLAS, through threadpoolctl) at ``threads``
    while the block runs; both are restored afterwards, also on an exception.

    numpy's BLAS does not follow ``torch.set_num_threads``: without this, it runs as many threads
    as there are cores. Without threadpoolctl only torch's threads are set. Why one thread per
    worker: docs/concepts/kappa.md, "Threads in a scan".
    """
    prev = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's BLAS then keeps its own thread count
        limits: Any = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=threads, user_api="blas")
    torch.set_num_threads(threads)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(prev)


def compute_local(items: Iterable[Looked], *, bar: Any = None, num_workers: Optional[int] = None,
                  score: str = "kappa") -> Dict[str, Result]:
    """Step 3 in one process: κ (or the SNR) of every item without a cached result.

    With one worker the tensors are analysed one at a time, numpy's BLAS using torch's thread count. With
    ``w > 1`` workers, ``w`` tensors are analysed at once by a thread pool (the linear algebra
    releases the GIL), each with one BLAS thread, and at most ``2w`` tensors are in hand at a time,
    so peak memory does not grow with the model. Each κ depends only on its own matrix: with one
    BLAS thread either way the parallel results are bit for bit the serial ones.

    Args:
        items (Iterable[Looked]): step 2's output (consumed lazily, in order; cached items only
            advance ``bar``).
        bar: a ``tqdm`` bar to advance per tensor (default ``None``).
        num_workers (Optional[int]): tensors analysed at once (default ``None``: :func:`resolve_workers`).
        score (str): ``"kappa"`` (default) or ``"snr"``.

    Returns:
        name → result of the computed items, in the order of ``items``.
    """
    workers = resolve_workers(num_workers)
    compute = _ops(score).compute
    out: Dict[str, Result] = {}
    if workers == 1:
        with _blas_threads(max(1, torch.get_num_threads())):  # numpy's BLAS follows torch's setting
            for it in items:
                if it.cached is None:
                    out[it.ref.name] = compute(it.ref, it.tensor)
                    it.tensor = None
                if bar is not None:
                    bar.update(1)
        return out

    from concurrent.futures import ThreadPoolExecutor

    pending: Deque[Tuple[str, Any]] = collections.deque()

    def settle_first() -> None:
        name, fut = pending.popleft()
        if fut is not None:
            out[name] = fut.result()
        if bar is not None:
            bar.update(1)

    with _blas_threads(1):
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kappatune-scan")
        try:
            in_flight = 0
            for it in items:
                if it.cached is None:
                    pending.append((it.ref.name, pool.submit(compute, it.ref, it.tensor)))
                    it.tensor = None
                    in_flight += 1
                else:
                    pending.append((it.ref.name, None))
                while in_flight > 2 * workers or (pending and pending[0][1] is None):
                    in_flight -= pending[0][1] is not None
                    settle_first()
            while pending:
                settle_first()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _cost(ref: TensorRef) -> int:
    m, n = matrix_dims(ref.shape, ref.layout)
    return num_matrices(ref.shape, ref.layout) * m * n * min(m, n)


def _shard(names_costs: List[Tuple[str, int]], world: int) -> Dict[str, int]:
    """Longest-processing-time assignment of work to ranks; deterministic (ties by name)."""
    load = [0] * world
    owner = {}
    for name, cost in sorted(names_costs, key=lambda x: (-x[1], x[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += cost
    return owner


def compute_sharded(refs: Sequence[TensorRef], known: Mapping[str, Result], *, bar: Any = None,
                    num_workers: Optional[int] = None, score: str = "kappa") -> Dict[str, Result]:
    """Step 3 over the ranks of the default process group: each rank computes its share.

    Every rank passes the refs it misses and the results it ``known`` (e.g. from its cache);
    the union of the missing ones is split by cost (longest first), each rank computes (or takes
    from ``known``) its share, and the results are gathered, so every rank returns κ of every
    ref any rank missed. ``num_workers`` and ``score`` as :func:`compute_local`, within each rank.

    Raises:
        RuntimeError: a rank was assigned a tensor it does not have (the ranks scan different models).
    """
    import torch.distributed as dist

    rank, world = rank_and_world()
    by_name = {r.name: r for r in refs}
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, [(r.name, _cost(r)) for r in refs])
    union: Dict[str, int] = {}
    for part in gathered:
        union.update(dict(part))
    owner = _shard(list(union.items()), world)
    mine = sorted(n for n, r in owner.items() if r == rank)
    unknown = [n for n in mine if n not in known and n not in by_name]
    if unknown:
        raise RuntimeError(f"rank {rank} was assigned {unknown[0]!r}, which it does not have; every rank "
                           "must scan the same set of tensors (scan before sharding the model with FSDP)")
    computed = {n: known[n] for n in mine if n in known}
    computed.update(compute_local((Looked(by_name[n], None, None) for n in mine if n not in known), bar=bar,
                                  num_workers=num_workers, score=score))
    gathered = [None] * world
    dist.all_gather_object(gathered, {n: dataclasses.astuple(r) for n, r in computed.items()})
    result = _ops(score).result
    out: Dict[str, Result] = {}
    for part in gathered:
        for name, vals in part.items():
            out.setdefault(name, result(*vals))
    lost = [r.name for r in refs if r.name not in out]
    if lost:
        raise RuntimeError(f"distributed κ scan lost results for {lost[:3]}")
    return out


# -- 4. store --------------------------------------------------------------------------------
def store(cache: Optional[KappaCache], refs: Sequence[TensorRef], results: Mapping[str, Result],
          digests: Mapping[str, str], *, write: bool = True, score: str = "kappa") -> int:
    """Step 4: record the ``results`` of ``refs`` under their digests; returns how many were recorded.

    Args:
        cache (Optional[KappaCache]): the cache (``None``: nothing happens).
        refs (Sequence[TensorRef]): the refs whose results are new (computed, or recomputed).
        results (Mapping[str, Result]): name → result.
        digests (Mapping[str, str]): name → content digest (from :func:`lookup`).
        write (bool): write the file (default ``True``; under a process group only rank 0 does).
        score (str): ``"kappa"`` (default) or ``"snr"``: the score of ``results`` (its own keys).
    """
    ops = _ops(score)
    if cache is None:
        return 0
    for ref in refs:
        res = results[ref.name]
        cache.put_many({KappaCache.key(digests[ref.name], res.layout, score): dict(
            ops.fields(res), shape=ref.shape, dtype=ref.dtype, name=ref.name)})
    if write and refs:
        cache.save()
    return len(refs)


# -- 5. table --------------------------------------------------------------------------------
def aggregate_kappa(res: Result, aggregate: str = "mean") -> float:
    """κ (or the SNR) of a result: the value itself, or the ``"mean"``/``"max"`` over the matrices of a stack."""
    if res.per_matrix is None:
        return res.kappa if isinstance(res, KappaEntry) else res.snr
    return aggregate_values(res.per_matrix, aggregate)


def build_table(refs: Sequence[TensorRef], results: Mapping[str, Result], digests: Mapping[str, str],
                skipped: Mapping[str, str], *, aggregate: str = "mean", score: str = "kappa") -> KappaTable:
    """Step 5: the :class:`KappaTable` of ``refs`` (best first) with the ``skipped`` reasons.

    Args:
        refs (Sequence[TensorRef]): the eligible refs.
        results (Mapping[str, Result]): name → result.
        digests (Mapping[str, str]): name → content digest.
        skipped (Mapping[str, str]): name → why it was not analysed.
        aggregate (str): ``"mean"`` (default) or ``"max"`` over the matrices of a stack.
        score (str): ``"kappa"`` (default: entries hold κ, lowest first) or ``"snr"`` (entries hold
            the SNR, ``kappa`` NaN, highest first).
    """
    _ops(score)
    entries = []
    for ref in refs:
        res = results[ref.name]
        if score == "kappa":
            entries.append(KappaEntry(
                name=ref.name, kappa=aggregate_kappa(res, aggregate), shape=tuple(ref.shape),
                numel=math.prod(ref.shape), dtype=ref.dtype, layout=res.layout, sigma_max=res.sigma_max,
                sigma_min=res.sigma_min, per_matrix=res.per_matrix, digest=digests.get(ref.name)))
        else:
            entries.append(KappaEntry(
                name=ref.name, kappa=math.nan, shape=tuple(ref.shape), numel=math.prod(ref.shape), dtype=ref.dtype,
                layout=res.layout, sigma_max=res.sigma_max, per_matrix=res.per_matrix, digest=digests.get(ref.name),
                snr=aggregate_kappa(res, aggregate), score=score))
    return KappaTable(entries, skipped, score=score)


def _recording(items: Iterable[Looked], into: List[Looked]) -> Iterator[Looked]:
    for it in items:
        into.append(it)
        yield it


def _progress(total: int, progress: Optional[bool], desc: str):
    if progress is False or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    # tqdm's convention: disable=None draws only when the stream is a terminal.
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=None if progress is None else False)


def _broadcast_table(table: KappaTable) -> KappaTable:
    import torch.distributed as dist

    obj = [table.to_dict()]
    dist.broadcast_object_list(obj, src=0)
    dist.barrier()
    return KappaTable.from_dict(obj[0])


# -- the pipeline ----------------------------------------------------------------------------
def scan(
    model: Union[nn.Module, Mapping[str, torch.Tensor]],
    *,
    min_ndim: int = 2,
    max_dim: Optional[int] = DEFAULT_MAX_DIM,
    include: Patterns = None,
    exclude: Patterns = None,
    cache: CacheArg = True,
    recompute: bool = False,
    aggregate: str = "mean",
    progress: Optional[bool] = None,
    num_workers: Optional[int] = None,
    score: str = "kappa",
) -> KappaTable:
    """κ (or Spectrum's SNR) of every eligible weight of ``model``, as a :class:`KappaTable`.

    Args:
        model (nn.Module or Mapping[str, Tensor]): a module (its ``named_parameters()``, tied
            weights once) or a state dict.
        min_ndim (int): tensors with fewer dimensions are skipped (default 2: biases and norms).
        max_dim (Optional[int]): skip tensors with a matrix side longer than this; ``None``
            analyses every size (default :data:`~kappatune.refs.DEFAULT_MAX_DIM`, 16384: the token
            embedding and an untied LM head of a large vocabulary are left out, on every entry point).
        include (None, str or sequence of str): regexes (``re.search``) a name must match one of
            (default ``None``: all).
        exclude (None, str or sequence of str): regexes no name may match (default ``None``).
        cache (bool, path or KappaCache): ``True`` (default) uses
            :func:`~kappatune.cache.default_cache_dir`; a path or a :class:`KappaCache` uses that;
            ``False``/``None`` disables caching.
        recompute (bool): ignore cached values; fresh values are still written (default ``False``).
        aggregate (str): ``"mean"`` (default) or ``"max"`` over the matrices of a stacked 3-D parameter.
        progress (Optional[bool]): a ``tqdm`` bar (if installed): ``None`` (default) draws it only
            when stderr is a terminal, ``True`` always, ``False`` never.
        num_workers (Optional[int]): matrices analysed at once, each with one BLAS thread
            (default ``None``: ``torch.get_num_threads()``, i.e. ``torch.set_num_threads`` /
            ``OMP_NUM_THREADS`` / the cores); ``1`` analyses one at a time with the BLAS threads as
            set. With several workers the table is bit for bit a serial scan with one BLAS thread
            (``torch.set_num_threads(1)``); other thread counts may change the last bits (~1e-15).
        score (str): ``"kappa"`` (default): κ = σ_max/σ_min (:func:`kappatune.kappa.kappa_of`), the
            table lowest κ first; ``"snr"``: Spectrum's signal-to-noise ratio of the singular values
            (:func:`kappatune.kappa.snr_of`), the table highest SNR first (entries' ``snr``; their
            ``kappa`` is NaN). Both are cached by content under keys of their own.

    Raises:
        ValueError: an invalid argument, or a tensor with NaN/Inf values or without data (meta),
            named in the message.

    Example::

        >>> snr = kappatune.scan(model, score="snr", max_dim=16384)
        >>> names = snr.select(top_fraction=0.25, group_by="kind")   # highest SNR per kind
    """
    if isinstance(model, nn.Module):
        from .distributed import check_wrapped_model

        check_wrapped_model(model, scanning=True)  # an FSDP-sharded model holds no whole matrices
        refs = model_refs(model)
    elif isinstance(model, Mapping):
        refs = state_dict_refs(model)
    else:
        raise TypeError(f"scan expects an nn.Module or a mapping of name -> tensor, got {type(model).__name__}")
    return scan_refs(refs, min_ndim=min_ndim, max_dim=max_dim, include=include, exclude=exclude,
                     cache=cache, recompute=recompute, aggregate=aggregate, progress=progress,
                     num_workers=num_workers, score=score)


def scan_refs(
    refs: Iterable[TensorRef],
    *,
    min_ndim: int = 2,
    max_dim: Optional[int] = DEFAULT_MAX_DIM,
    include: Patterns = None,
    exclude: Patterns = None,
    cache: CacheArg = True,
    recompute: bool = False,
    aggregate: str = "mean",
    progress: Optional[bool] = None,
    num_workers: Optional[int] = None,
    score: str = "kappa",
) -> KappaTable:
    """:func:`scan` over :class:`TensorRef` objects (a checkpoint's, or any loader's); same arguments.

    Args:
        refs (Iterable[TensorRef]): the tensors, each read by ``ref.load()`` when its score is not
            cached; names must be unique.
        min_ndim (int, optional): tensors with fewer dimensions are skipped. Default: ``2``.
        max_dim (int, optional): skip tensors with a matrix side longer than this; ``None`` analyses
            every size. Default: :data:`~kappatune.refs.DEFAULT_MAX_DIM` (16384).
        include (None, str or sequence of str, optional): regexes (``re.search``) a name must match
            one of. Default: ``None`` (all).
        exclude (None, str or sequence of str, optional): regexes no name may match. Default:
            ``None``.
        cache (bool, None, str, PathLike or KappaCache, optional): ``True`` uses
            :func:`~kappatune.cache.default_cache_dir`; a path or a :class:`KappaCache` uses that;
            ``False``/``None`` disables caching. Default: ``True``.
        recompute (bool, optional): ignore cached values; fresh values are still written. Default:
            ``False``.
        aggregate (str, optional): ``"mean"`` or ``"max"`` over the matrices of a stacked 3-D
            parameter. Default: ``"mean"``.
        progress (bool, optional): a ``tqdm`` bar: ``None`` only when stderr is a terminal,
            ``True`` always, ``False`` never. Default: ``None``.
        num_workers (int, optional): matrices analysed at once, as in :func:`scan`. Default: ``None``
            (``torch.get_num_threads()``).
        score (str, optional): ``"kappa"``, :math:`\\kappa = \\sigma_{\\max}/\\sigma_{\\min}` (lowest
            first), or ``"snr"``, Spectrum's :math:`\\text{signal}/\\text{noise}/\\sigma_{\\max}`
            (highest first). Default: ``"kappa"``.

    Raises:
        ValueError: an invalid argument, or a tensor with NaN/Inf values or without data (meta),
            named in the message.
    """
    if aggregate not in ("mean", "max"):
        raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    resolve_workers(num_workers)  # a bad value fails before any work
    _ops(score)  # a bad score fails before any work
    what = SCORES[score].symbol
    names = NameFilter(include, exclude)
    cache_ = resolve_cache(cache)
    rank, world = rank_and_world()
    distributed = world > 1
    t0 = time.perf_counter()

    eligible, skipped = filter_refs(refs, min_ndim=min_ndim, max_dim=max_dim, names=names)
    bar = _progress(len(eligible), progress if rank == 0 else False, f"{what} scan")
    try:
        if distributed:  # every rank digests its tensors, then the ranks share out the missing ones
            looked = [dataclasses.replace(it, tensor=None)
                      for it in lookup(eligible, cache_, recompute=recompute, score=score)]
            cached = {it.ref.name: it.cached for it in looked if it.cached is not None}
            if bar is not None:
                bar.update(len(cached))
            new = compute_sharded([it.ref for it in looked if it.cached is None], cached, bar=bar,
                                  num_workers=num_workers, score=score)
        else:
            looked = []
            new = compute_local(_recording(lookup(eligible, cache_, recompute=recompute, score=score), looked),
                                bar=bar, num_workers=num_workers, score=score)
    finally:
        if bar is not None:
            bar.close()
    digests = {it.ref.name: it.digest for it in looked if it.digest is not None}
    results = {**{it.ref.name: it.cached for it in looked if it.cached is not None}, **new}
    missing = [it.ref for it in looked if it.cached is None]
    store(cache_, missing, results, digests, write=rank == 0, score=score)
    table = build_table(eligible, results, digests, skipped, aggregate=aggregate, score=score)
    if distributed:
        table = _broadcast_table(table)

    reasons = Counter(skipped.values())
    logger.info(
        "%s scan: %d tensors analysed (%d from cache, %d computed%s) in %.2fs; %d skipped%s", what,
        len(eligible), len(eligible) - len(missing), len(missing),
        f" over {world} ranks" if distributed else "", time.perf_counter() - t0, len(skipped),
        (" (" + ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items())) + ")") if reasons else "",
    )
    return table
