r"""Deltas: what selective fine-tuning changed, saved small and blended back into the base.

A delta folder holds the trained tensors only, so it is about the trained fraction of the
checkpoint's size. It has the shape of a PEFT adapter folder:

* ``delta_model.safetensors``: the **trained values** :math:`W_1` of each trained tensor, under its
  parameter name, in its dtype;
* ``delta_config.json``: ``format``, ``version``, per tensor its shape, dtype, the content digest of
  its **base** value :math:`W_0` (:func:`kappatune.cache.tensor_digest`, the κ cache's digest) and of
  :math:`W_1`, the κ table rows of the trained tensors, and how it was trained.

:func:`apply_delta` first checks every base digest against the model and refuses a model that is
not the base the delta was trained from, then sets

.. math::

    W \leftarrow W_0 + \alpha\,(W_1 - W_0),

computed in float64 and rounded once to the tensor's dtype; ``alpha=1`` writes :math:`W_1` itself
(the fine-tuned model bit for bit) and ``alpha=0`` leaves :math:`W_0` (the base bit for bit).
Values in between trace the learning–forgetting trade-off after training (WiSE-FT, Wortsman et
al. 2022) at no training cost. :func:`apply_delta_to_checkpoint` (the ``kappatune apply-delta``
command) does the same for a safetensors checkpoint on disk, one tensor in memory at a time.

Example::

    >>> opt.save_delta("kjv-delta")                       # after training
    >>> model = AutoModelForCausalLM.from_pretrained(base_dir)
    >>> applied = kappatune.apply_delta(model, "kjv-delta", alpha=0.5)
    >>> applied.restore()                                 # the base again, bit for bit
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._files import umask, write_atomic
from ._numbers import encode_float
from .cache import tensor_digest
from .distributed import unwrap_model
from .refs import SAFETENSORS_DTYPES, dtype_name
from .resolve import named_parameters

__all__ = ["apply_delta", "AppliedDelta", "DeltaError"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
DELTA_CONFIG_NAME = "delta_config.json"
DELTA_WEIGHTS_NAME = "delta_model.safetensors"
_FORMAT = "kappatune-delta"
_VERSION = 1
# safetensors dtype codes of the dtypes a delta may hold
_ST_DTYPES = {c: getattr(torch, SAFETENSORS_DTYPES[c][0]) for c in ("F64", "F32", "F16", "BF16")}
_DTYPES_BY_NAME = {dtype_name(d): d for d in _ST_DTYPES.values()}


class DeltaError(ValueError):
    """A delta that cannot be written or applied, with what is wrong and how to fix it."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - safetensors comes with transformers and the hf/cli extras
        raise DeltaError("deltas are safetensors files: pip install safetensors") from None
    return st


def _prepare_folder(path: Path, overwrite: bool) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise DeltaError(f"{path}: exists and is not a folder; give a new folder for the delta")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in (DELTA_CONFIG_NAME, DELTA_WEIGHTS_NAME))
        ours = [n for n in (DELTA_CONFIG_NAME, DELTA_WEIGHTS_NAME) if (path / n).exists()]
        if others:
            raise DeltaError(f"{path}: is a folder that holds other files (e.g. {others[0]!r}); give a new or empty "
                             "folder for the delta")
        if ours and not overwrite:
            raise DeltaError(f"{path}: already holds a delta; pass overwrite=True to replace it, or another folder")
    path.mkdir(parents=True, exist_ok=True)


def save_delta(path: PathLike, *, tuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
               entries: Optional[Mapping[str, Any]] = None, model: Optional[nn.Module] = None,
               overwrite: bool = False, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a delta folder: the tuned values, and the digest of each tensor's base value.

    :meth:`kappatune.KappaTuneOptimizer.save_delta` calls this with the optimizer's trained
    tensors; call it directly for tensors trained another way.

    Args:
        path (str or PathLike): the folder (created; it must not hold other files).
        tuned (Mapping[str, Tensor]): parameter name → trained value :math:`W_1`.
        base (Mapping[str, Tensor]): parameter name → pretrained value :math:`W_0`, same keys,
            shapes and dtypes.
        entries (Mapping[str, KappaEntry], optional): the κ table rows of the trained tensors,
            recorded in the config. Default: ``None``.
        model (nn.Module, optional): the model, for its class name and ``config.name_or_path``.
            Default: ``None``.
        overwrite (bool, optional): replace the delta in a folder that already holds one.
            Default: ``False``.
        extra (Mapping[str, Any], optional): JSON-serialisable facts to record under
            ``"training"``. Default: ``None``.

    Returns:
        Path: the folder.
    """
    st = _safetensors()
    path = Path(path).expanduser()
    if set(tuned) != set(base):
        missing = sorted(set(tuned) ^ set(base))
        raise DeltaError(f"save_delta: tuned and base name different tensors (e.g. {missing[0]!r})")
    if not tuned:
        raise DeltaError("save_delta: no trained tensors to save")
    tensors: Dict[str, Any] = {}
    tensors_cpu: Dict[str, torch.Tensor] = {}
    for n, w1 in tuned.items():
        w0 = base[n]
        if tuple(w0.shape) != tuple(w1.shape) or w0.dtype != w1.dtype:
            raise DeltaError(f"save_delta: {n!r} is {w1.dtype} {tuple(w1.shape)} but its base value "
                             f"{w0.dtype} {tuple(w0.shape)}")
        if w1.dtype not in _ST_DTYPES.values():
            raise DeltaError(f"save_delta: {n!r} has dtype {w1.dtype}; deltas hold float64/32/16 and bfloat16 tensors")
        cpu = w1.detach().to("cpu", copy=True).contiguous()
        tensors_cpu[n] = cpu
        tensors[n] = {"shape": list(cpu.shape), "dtype": dtype_name(cpu.dtype), "base_digest": tensor_digest(w0),
                      "tuned_digest": tensor_digest(cpu)}
        e = (entries or {}).get(n)
        if e is not None:
            tensors[n]["kappa"] = encode_float(float(e.kappa))
    changed = sum(1 for n in tensors if tensors[n]["base_digest"] != tensors[n]["tuned_digest"])
    from . import __version__

    cfg = {
        "format": _FORMAT,
        "version": _VERSION,
        "kappatune_version": __version__,
        "stores": "tuned values W1; apply_delta sets W0 + alpha * (W1 - W0)",
        "model_class": type(model).__name__ if model is not None else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "num_tensors": len(tensors),
        "num_changed": changed,
        "numel": sum(t.numel() for t in tensors_cpu.values()),
        "nbytes": sum(t.numel() * t.element_size() for t in tensors_cpu.values()),
        "tensors": tensors,
        "kappa_table": [e.to_dict() for e in (entries or {}).values()],
        "training": dict(extra or {}),
    }
    _prepare_folder(path, overwrite)
    text = json.dumps(cfg, indent=2, allow_nan=False) + "\n"
    write_atomic(path / DELTA_WEIGHTS_NAME,
               lambda tmp: st.save_file(tensors_cpu, str(tmp), metadata={"format": "pt", "kappatune": _FORMAT}))
    write_atomic(path / DELTA_CONFIG_NAME, text.encode("utf-8"))
    logger.info("save_delta: %d tensors (%d changed), %s bytes to %s", len(tensors), changed, cfg["nbytes"], path)
    return path


def read_delta(path: PathLike) -> Dict[str, Any]:
    """The checked ``delta_config.json`` of a delta folder (:class:`DeltaError` names what is wrong)."""
    path = Path(path).expanduser()
    cfg_path, weights = path / DELTA_CONFIG_NAME, path / DELTA_WEIGHTS_NAME
    if not path.is_dir():
        raise DeltaError(f"{path}: no such delta folder (write one with opt.save_delta(path))")
    for f in (cfg_path, weights):
        if not f.is_file():
            raise DeltaError(f"{path}: not a delta folder, {f.name} is missing (write one with opt.save_delta(path))")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DeltaError(f"{cfg_path}: cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT or not isinstance(cfg.get("tensors"), dict):
        raise DeltaError(f"{cfg_path}: not a kappatune delta config (format {_FORMAT!r} expected)")
    if not isinstance(cfg.get("version"), int) or cfg["version"] > _VERSION:
        raise DeltaError(f"{cfg_path}: delta format version {cfg.get('version')!r} is newer than this kappatune "
                         f"reads ({_VERSION}); upgrade kappatune")
    for n, t in cfg["tensors"].items():
        if not (isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("base_digest"), str)
                and isinstance(t.get("tuned_digest"), str) and t.get("dtype") in {dtype_name(d) for d in
                                                                               _ST_DTYPES.values()}):
            raise DeltaError(f"{cfg_path}: the entry of {n!r} is malformed (shape, dtype, digests)")
    return cfg


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise DeltaError(f"alpha must be a finite number (0 = base, 1 = fine-tuned), got {alpha!r}")
    return float(alpha)


def _tuned_tensor(f: Any, name: str, meta: Mapping[str, Any], where: Path) -> torch.Tensor:
    try:
        t = f.get_tensor(name)
    except Exception:
        raise DeltaError(f"{where}: holds no tensor {name!r} although its config lists it; the delta is "
                         "incomplete") from None
    if tensor_digest(t) != meta["tuned_digest"]:
        raise DeltaError(f"{where}: the stored value of {name!r} does not match its digest in {DELTA_CONFIG_NAME}; "
                         "the delta is corrupt, save it again")
    return t


def _blend(w0: torch.Tensor, w1: torch.Tensor, alpha: float, delta_dtype: torch.dtype) -> torch.Tensor:
    """:math:`W_0 + \\alpha (W_1 - W_0)` in float64, rounded once to ``w0``'s dtype.

    ``alpha=0`` returns ``w0`` and ``alpha=1`` returns ``w1`` (in ``w0``'s dtype: rounded once when
    the base is stored narrower than the delta, else exact).
    """
    if alpha == 0.0:
        return w0.clone()
    if alpha == 1.0:
        return w1.to(dtype=w0.dtype, copy=True)
    a = w0.to(delta_dtype).to(torch.float64)
    return (a + alpha * (w1.to(device=a.device, dtype=torch.float64) - a)).to(w0.dtype)


def _check_base(name: str, w0: torch.Tensor, meta: Mapping[str, Any], where: str, delta: str, fix: str) -> None:
    """Refuse ``w0`` unless it is the delta's base value of ``name`` (compared in the delta's dtype)."""
    if list(w0.shape) != list(meta["shape"]):
        raise DeltaError(f"{name!r} has shape {tuple(w0.shape)} in {where} but {tuple(meta['shape'])} in {delta}; "
                         f"{fix}")
    widened = w0 if dtype_name(w0.dtype) == meta["dtype"] else w0.to(_DTYPES_BY_NAME[meta["dtype"]])
    if tensor_digest(widened) != meta["base_digest"]:
        other = ("" if widened is w0 else f" (compared in {meta['dtype']}, the delta's dtype; {where} holds it as "
                 f"{dtype_name(w0.dtype)})")
        raise DeltaError(f"{name!r} of {where} is not the base this delta was trained from (its content digest "
                         f"differs from the delta's{other}); {fix}")


@dataclass
class AppliedDelta:
    """What :func:`apply_delta` changed, and the base values to put back.

    Attributes:
        names (List[str]): the tensors written.
        alpha (float): the blend applied.
    """

    names: List[str]
    alpha: float
    _params: List[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    _base: List[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base values back (bit for bit); a second call does nothing."""
        for p, b in zip(self._params, self._base):
            p.copy_(b)
        self._params, self._base = [], []


def apply_delta(model: nn.Module, path: PathLike, alpha: float = 1.0) -> AppliedDelta:
    r"""Blend a delta into ``model`` in place: :math:`W \leftarrow W_0 + \alpha (W_1 - W_0)`.

    Every tensor of the delta is checked first: it must be a parameter of ``model`` with the
    delta's shape whose current value, in the delta's dtype, has the delta's base digest, i.e.
    ``model`` must be the pretrained model the delta was trained from. A model held in another
    dtype (bfloat16 weights, a float32 delta) is compared after conversion to the delta's dtype,
    and the blend is rounded once to the model's dtype. Nothing is changed unless every check
    passes.

    Args:
        model (nn.Module): the base model (a DDP/``torch.compile`` wrapper is unwrapped).
        path (str or PathLike): a delta folder written by
            :meth:`~kappatune.KappaTuneOptimizer.save_delta`.
        alpha (float, optional): the blend; ``1`` gives the fine-tuned tensors bit for bit (in a
            narrower dtype than the delta's: rounded once), ``0`` the base bit for bit, values
            between interpolate (computed in float64, rounded once), values outside extrapolate.
            Default: ``1.0``.

    Returns:
        AppliedDelta: the names written; its :meth:`~AppliedDelta.restore` puts the base back
            (it keeps a copy of the written tensors' base values, the delta's size).

    Raises:
        DeltaError: a delta folder that is missing or corrupt, a tensor the model lacks or holds
            with another shape, a model that is not the delta's base (naming the first tensor that
            differs), or a non-finite ``alpha``.
    """
    alpha = _check_alpha(alpha)
    path = Path(path).expanduser()
    cfg = read_delta(path)
    module = unwrap_model(model)
    by_name = named_parameters(module)
    metas: Dict[str, Mapping[str, Any]] = cfg["tensors"]
    params: List[Tuple[str, torch.Tensor]] = []
    for n, meta in metas.items():
        p = by_name.get(n)
        if p is None:
            raise DeltaError(f"{n!r} of the delta {path} is not a parameter of {type(module).__name__}; apply it to "
                             "the model it was trained from")
        _check_base(n, p.detach(), meta, type(module).__name__, f"the delta {path}",
                    "load the pretrained model the delta was trained from (a model that already has a delta applied "
                    "is not its base: restore() it first)")
        params.append((n, p))
    st = _safetensors()
    out = AppliedDelta(names=[n for n, _ in params], alpha=alpha)
    with st.safe_open(str(path / DELTA_WEIGHTS_NAME), framework="pt") as f, torch.no_grad():
        new = [_blend(p.detach(), _tuned_tensor(f, n, metas[n], path / DELTA_WEIGHTS_NAME).to(p.device), alpha,
                      _DTYPES_BY_NAME[metas[n]["dtype"]])
               for n, p in params]
        for (n, p), w in zip(params, new):
            out._params.append(p)
            out._base.append(p.detach().clone())
            p.copy_(w)
    logger.info("apply_delta: %d tensors blended at alpha=%g from %s", len(params), alpha, path)
    return out


# -- checkpoints on disk ------------------------------------------------------------------------
def apply_delta_to_checkpoint(base_dir: PathLike, delta_dir: PathLike, out_dir: PathLike, alpha: float = 1.0
                              ) -> Dict[str, Any]:
    r"""Write ``base_dir`` with a delta blended in (:math:`W_0 + \alpha (W_1 - W_0)`) as a new checkpoint folder.

    The output is a safetensors checkpoint folder that ``from_pretrained`` loads: every weight file
    of ``base_dir`` is rewritten with the same header and layout, the delta's tensors blended as
    in :func:`apply_delta` (bit for bit the same values, in the checkpoint's dtype), every other
    tensor copied byte for byte; every other regular file (``config.json``, the tokenizer's files,
    the index of a sharded checkpoint) is copied, except weights in other formats and a trainer's
    state (``*.bin``, ``*.pt``, ``*.gguf``, other ``*.safetensors`` files, …), which would hold the
    base without the delta: they are left out with a warning. The base digest of each delta tensor is checked before anything is
    written. One tensor is in memory at a time. The folder is built under a temporary name beside
    ``out_dir`` and renamed into place at the end, so an interrupted run leaves no half-written
    checkpoint; an existing ``out_dir`` is never touched.

    Args:
        base_dir (str or PathLike): the base model's folder (safetensors weights).
        delta_dir (str or PathLike): a delta folder.
        out_dir (str or PathLike): the folder to create; it must not exist.
        alpha (float, optional): the blend, as in :func:`apply_delta`. Default: ``1.0``.

    Returns:
        Dict[str, Any]: ``{"out": path, "tensors": blended count, "copied": other tensors, "files": files
            written, "bytes": bytes written, "skipped": files left out}``.
    """
    from .checkpoint import CheckpointError, SafetensorsFile, checkpoint_files

    alpha = _check_alpha(alpha)
    base_dir, delta_dir, out = (Path(p).expanduser() for p in (base_dir, delta_dir, out_dir))
    if not base_dir.is_dir():
        raise DeltaError(f"{base_dir}: not a folder; give the base model's checkpoint folder")
    if os.path.lexists(out):
        raise DeltaError(f"{out}: already exists; give a new folder for the output (nothing was written)")
    cfg = read_delta(delta_dir)
    metas: Dict[str, Mapping[str, Any]] = cfg["tensors"]
    files: List[Any] = []
    try:
        files = [SafetensorsFile(f) for f in checkpoint_files(base_dir)]
        where = {name: f for f in files for name, *_ in f.tensors()}
        # 1. every base digest, before anything is written
        for n, meta in metas.items():
            f = where.get(n)
            if f is None:
                raise DeltaError(f"{n!r} of the delta {delta_dir} is not in the checkpoint {base_dir}; apply it to the "
                                 "base it was trained from")
            _check_base(n, f.read(n), meta, str(f.path), "the delta", "give the checkpoint the delta was trained from")
        # 2. the new folder, under a temporary name, renamed into place at the end
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            stats = _write_blended(base_dir, delta_dir, tmp, files, metas, alpha)
            os.chmod(tmp, 0o777 & ~umask())
            if os.path.lexists(out):
                raise DeltaError(f"{out}: appeared while the checkpoint was being written; nothing replaced")
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except CheckpointError as e:
        raise DeltaError(str(e)) from None
    finally:
        for f in files:
            f.close()
    stats["out"] = str(out)
    return stats


def _write_blended(base_dir: Path, delta_dir: Path, tmp: Path, files: Sequence[Any],
                   metas: Mapping[str, Mapping[str, Any]], alpha: float) -> Dict[str, Any]:
    """Each weight file of ``files`` rewritten into ``tmp`` (same header, the delta blended), then the other files."""
    st = _safetensors()
    blended = copied = nbytes = 0
    written: List[str] = []
    with st.safe_open(str(delta_dir / DELTA_WEIGHTS_NAME), framework="pt") as delta:
        for f in files:
            head = f.header_bytes()
            dst = tmp / f.path.name
            with open(dst, "xb") as w:
                w.write(head)  # the header verbatim: same names, dtypes and offsets
                pos = len(head)
                for name, _code, _shape, offset, size in f.tensors():
                    if offset > pos:  # padding between tensors, copied as it is
                        f.copy_range(w, pos, offset - pos)
                    if name in metas:
                        w1 = _tuned_tensor(delta, name, metas[name], delta_dir / DELTA_WEIGHTS_NAME)
                        data = _blend(f.read(name), w1, alpha, _DTYPES_BY_NAME[metas[name]["dtype"]]).contiguous()
                        w.write(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
                        blended += 1
                    else:
                        f.copy_range(w, offset, size)
                        copied += 1
                    pos = max(pos, offset + size)
                end = f.size()
                if end > pos:
                    f.copy_range(w, pos, end - pos)
                w.flush()
                os.fsync(w.fileno())
            nbytes += dst.stat().st_size
            written.append(f.path.name)
    weight_files = {f.path.resolve() for f in files}
    skipped: List[str] = []
    for item in sorted(base_dir.iterdir()):
        if item.resolve() in weight_files or item.name in written:
            continue
        if item.is_file() and _other_weights(item.name):
            skipped.append(item.name)
        elif item.is_file() and not item.name.startswith("."):
            shutil.copyfile(item, tmp / item.name)
            nbytes += item.stat().st_size
            written.append(item.name)
        elif item.is_dir():
            logger.warning("apply-delta: the sub-folder %s of the base checkpoint is not copied", item)
    if skipped:
        logger.warning("apply-delta: not copied, since they would hold the base's weights or training state without "
                       "the delta: %s", ", ".join(skipped))
    return {"tensors": blended, "copied": copied, "files": written, "bytes": nbytes, "skipped": skipped}


# Weights in other formats (or other safetensors files) and a trainer's state: copied unblended, they
# would give the base model to whatever loads them.
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".onnx", ".safetensors",
                    ".bin.index.json", ".pt.index.json", ".h5.index.json", ".msgpack.index.json")


def _other_weights(name: str) -> bool:
    return name.lower().endswith(_WEIGHT_SUFFIXES)
