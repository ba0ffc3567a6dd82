"""κ of the weights of a safetensors checkpoint, read from disk without instantiating the model.

:func:`scan_checkpoint` takes a Hugging Face model folder, a sharded checkpoint's index
(``model.safetensors.index.json``) or one or more ``.safetensors`` files, and returns the same
:class:`~kappatune.selection.KappaTable` that :func:`kappatune.scan` returns for the loaded model.

Memory
------
Every tensor is read on its own: the file is opened with ``safetensors.safe_open`` (memory-mapped),
that one tensor is taken with ``get_tensor``, and the file is closed again before the next one, so
the pages of a tensor leave the process once its κ is known. Keeping one handle open for the
whole scan would leave every page read so far resident, and the process would grow to the size of
the checkpoint. Peak memory is therefore about one tensor plus its float64 working copy
(:mod:`kappatune.kappa` upcasts chunk by chunk), whatever the size of the checkpoint.

Names, digests and the cache
----------------------------
Tensor names are the checkpoint's keys. ``save_pretrained`` writes the names of
``model.named_parameters()`` (a tied weight once), so the table, the selection and the
:class:`~kappatune.cache.KappaCache` entries written here are the ones the loaded model uses: the
cache key is a digest of dtype, shape and bytes, so ``kappatune.scan(model)`` (or
``KappaTuneOptimizer``) reuses every κ without recomputation when the model is loaded in the
checkpoint's dtype. A model loaded in another dtype (a bf16 checkpoint loaded as float32) has
other bytes and is recomputed, never matched wrongly.

Layouts: 2-D tensors are matrices; 3-D tensors whose name contains ``conv`` (case-insensitive)
are convolution kernels ``(out, in, k)``, reshaped to ``(out, in·k)`` (``"flatten"``); other 3-D
tensors are stacks of matrices such as fused mixture-of-experts weights ``(experts, m, n)``
(``"stack"``, κ per matrix, aggregated); tensors of 4 or more dimensions are flattened. This is the
rule :func:`kappatune.scan` applies to a module tree, where convolutions are recognised by their
module class. Integer, boolean and float8 tensors are skipped (float8 weights need their separate
scales to mean anything).

Example::

    >>> table = kappatune.scan_checkpoint("path/to/model", max_dim=16384, cache="cache")
    >>> names = table.select(top_fraction=0.1)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch

from .refs import TensorRef, default_layout
from .scan import scan_refs
from .selection import KappaTable

__all__ = ["scan_checkpoint", "checkpoint_refs", "checkpoint_files", "checkpoint_layout", "CheckpointError",
           "INDEX_NAME", "WEIGHTS_NAME"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"

# safetensors dtype codes → torch dtype names (the ``str(torch.dtype)`` spelling without "torch.").
_DTYPES: Dict[str, Tuple[str, bool]] = {
    "F64": ("float64", True), "F32": ("float32", True), "F16": ("float16", True),
    "BF16": ("bfloat16", True),
    # float8 weights come with separate scales (per block, often): κ of the raw values would not be
    # κ of the weight, so they are skipped like integer tensors.
    "F8_E4M3": ("float8_e4m3fn", False), "F8_E5M2": ("float8_e5m2", False),
    "I64": ("int64", False), "I32": ("int32", False), "I16": ("int16", False), "I8": ("int8", False),
    "U64": ("uint64", False), "U32": ("uint32", False), "U16": ("uint16", False), "U8": ("uint8", False),
    "BOOL": ("bool", False), "C64": ("complex64", False),
}
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")


class CheckpointError(ValueError):
    """A checkpoint path that cannot be read, with what is wrong and how to fix it."""


def checkpoint_layout(name: str, shape: Sequence[int]) -> str:
    """The κ layout of a checkpoint tensor: :func:`kappatune.refs.default_layout` without a module.

    ``"flatten"`` for a 3-D tensor named ``…weight`` or containing ``conv`` (a convolution
    kernel), else ``"auto"`` (2-D → matrix, 3-D → stack of matrices, ≥ 4-D → flattened).
    """
    return default_layout(name, shape)


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency of the cli extra
        raise CheckpointError("reading checkpoints needs the safetensors package: pip install safetensors") from None
    try:
        return safe_open(str(path), framework="pt")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    except Exception as e:  # safetensors.SafetensorError: the file is not a valid safetensors file
        if type(e).__name__ != "SafetensorError":
            raise
        hint = ""
        if path.suffix.lower() in _OTHER_WEIGHTS:
            hint = f"; {path.suffix} files are not read, save the model with save_pretrained (safetensors) first"
        elif path.suffix.lower() != ".safetensors":
            hint = "; is it a .safetensors file?"
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}){hint}") from None


def _read_index(index: Path) -> List[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read the checkpoint index ({e})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' object of name -> shard file)")
    shards = [index.parent / f for f in dict.fromkeys(wm.values())]
    missing = [str(s.name) for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard file(s) listed in the index are missing: {missing[:5]}; "
                              "download or copy the complete checkpoint")
    return shards


def _resolve_one(path: Path) -> Tuple[List[Path], List[Path]]:
    """(safetensors files, index files) for one user-given path."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _read_index(path / INDEX_NAME), [path / INDEX_NAME]
        if (path / WEIGHTS_NAME).is_file():
            return [path / WEIGHTS_NAME], []
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _read_index(indexes[0]), indexes
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if files:
            return files, []
        others = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _OTHER_WEIGHTS)
        raise CheckpointError(
            f"{path}: folder has no .safetensors weights"
            + (f" (found {', '.join(others[:3])}: only safetensors checkpoints are read; re-save the model "
               "with save_pretrained, which writes safetensors)" if others
               else "; pass a Hugging Face model folder saved with save_pretrained, or .safetensors files")
        )
    if path.name.endswith(".json"):
        return _read_index(path), [path]
    return [path], []


def _resolve(path_or_paths: Union[PathLike, Sequence[PathLike]]) -> Tuple[List[Path], List[Path]]:
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths:
        raise CheckpointError("no checkpoint path given")
    files: List[Path] = []
    indexes: List[Path] = []
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"checkpoint paths must be str or os.PathLike, got {type(p).__name__}")
        found, idx = _resolve_one(Path(p).expanduser())
        files.extend(found)
        indexes.extend(idx)
    return _unique(files), _unique(indexes)


def _unique(paths: List[Path]) -> List[Path]:
    seen: Dict[Path, Path] = {}
    for p in paths:
        seen.setdefault(p.resolve(), p)
    return list(seen.values())


def checkpoint_files(path_or_paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """The ``.safetensors`` files of a folder, an index file or a list of files (in order, once each).

    A folder uses, in this order: ``model.safetensors.index.json``; ``model.safetensors``; the one
    ``*.safetensors.index.json``; every ``*.safetensors`` file in it.
    """
    return _resolve(path_or_paths)[0]


def _loader(path: Path, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        # A fresh handle per tensor: the mapping goes away with the tensor (see the module docstring).
        with _safe_open(path) as f:
            return f.get_tensor(name)

    return load


def checkpoint_refs(path_or_paths: Union[PathLike, Sequence[PathLike]]) -> List[TensorRef]:
    """One lazily loaded :class:`~kappatune.refs.TensorRef` per tensor of the checkpoint.

    Only the headers are read here; ``ref.load()`` maps the file and returns that one tensor.
    Raises :class:`CheckpointError` for a missing path, a folder without safetensors weights, a
    file that is not valid safetensors, an index naming a tensor its shard lacks, or a tensor name
    that appears in two files.
    """
    files, indexes = _resolve(path_or_paths)
    expected: Dict[str, Tuple[str, Path]] = {}
    for idx in indexes:
        for name, shard in json.loads(idx.read_text(encoding="utf-8"))["weight_map"].items():
            expected[name] = (shard, idx)
    refs: List[TensorRef] = []
    where: Dict[str, Path] = {}
    for path in files:
        with _safe_open(path) as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"tensor {name!r} is in both {where[name]} and {path}; "
                                          "pass the files of one checkpoint only")
                where[name] = path
                sl = f.get_slice(name)
                shape = tuple(int(s) for s in sl.get_shape())
                code = sl.get_dtype()
                dtype, floating = _DTYPES.get(code, (code.lower(), False))
                refs.append(TensorRef(name=name, shape=shape, dtype=dtype, load=_loader(path, name),
                                      layout=checkpoint_layout(name, shape), floating=floating))
    for name, (shard, idx) in expected.items():
        if name not in where:
            raise CheckpointError(f"{idx}: the index puts {name!r} in {shard}, which does not hold it; "
                                  "the checkpoint is incomplete or the index is stale")
    logger.debug("checkpoint: %d tensors in %d file(s)", len(refs), len(files))
    return refs


def scan_checkpoint(path_or_paths: Union[PathLike, Sequence[PathLike]], **scan_kwargs: Any) -> KappaTable:
    """κ of every eligible tensor of a safetensors checkpoint, without instantiating the model.

    Args:
        path_or_paths: a model folder, an index file (``model.safetensors.index.json``) or one or
            more ``.safetensors`` files.
        **scan_kwargs: as :func:`kappatune.scan`: ``min_ndim``, ``max_dim``, ``include``,
            ``exclude``, ``cache``, ``recompute``, ``aggregate``, ``progress``.

    Tensors are read one at a time (memory-mapped), so peak memory stays near one tensor and
    its float64 copy. The names are the checkpoint keys, i.e. the model's
    ``named_parameters()`` for a ``save_pretrained`` checkpoint, and the cache entries are
    reused by ``kappatune.scan(model)`` on the model loaded in the checkpoint's dtype.

    Example::

        >>> table = kappatune.scan_checkpoint("SmolLM2-135M/", max_dim=16384)
        >>> table.select(param_budget=0.05)
    """
    return scan_refs(checkpoint_refs(path_or_paths), **scan_kwargs)
