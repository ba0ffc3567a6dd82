"""κ of the weights of a safetensors checkpoint, read from disk without instantiating the model.

:func:`scan_checkpoint` takes a Hugging Face model folder, a sharded checkpoint's index
(``model.safetensors.index.json``) or one or more ``.safetensors`` files, and returns the same
:class:`~kappatune.table.KappaTable` that :func:`kappatune.scan` returns for the loaded model.

Memory and speed
----------------
Each file is opened once: its header is parsed once (``safetensors`` validates it) and one file
descriptor is kept for all its tensors. A tensor is read on its own with ``pread`` into a buffer
of exactly its size, nothing is memory-mapped, so no page of the file stays in the process once
the tensor's κ is known. Peak memory is therefore about one tensor plus its float64 working copy
(:mod:`kappatune.kappa` upcasts chunk by chunk), whatever the size of the checkpoint, and a file of
thousands of tensors is not re-opened (and its header re-parsed) for every one of them.

Only regular files are read: a FIFO or a device given as a checkpoint is refused rather than
waited on, and the shard names in an index must lie inside the index's folder.

Names, digests and the cache
----------------------------
Tensor names are the checkpoint's keys. ``save_pretrained`` writes the names of
``model.named_parameters()`` (a tied weight once), so the table, the selection and the
:class:`~kappatune.cache.KappaCache` entries written here are the ones the loaded model uses: the
cache key is a digest of dtype, shape and bytes, so ``kappatune.scan(model)`` (or
``KappaTuneOptimizer``) reuses every κ without recomputation when the model is loaded in the
checkpoint's dtype. A model loaded in another dtype (a bf16 checkpoint loaded as float32) has
other bytes and is recomputed, never matched wrongly.

Layouts: 2-D tensors are matrices; 3-D tensors whose name ends in ``.weight`` or contains
``conv`` (case-insensitive) are convolution kernels ``(out, in, k)``, reshaped to ``(out, in·k)``
(``"flatten"``); other 3-D tensors are stacks of matrices such as fused mixture-of-experts
weights ``(experts, m, n)`` (``"stack"``, κ per matrix, aggregated); tensors of 4 or more
dimensions are flattened. This is the rule :func:`kappatune.scan` applies to a module tree, where
convolutions are recognised by their module class. Integer and boolean tensors are skipped.

float8 tensors (``F8_E4M3``, ``F8_E5M2`` and their ``FNUZ`` variants) are analysed, as
:func:`kappatune.scan` analyses a float8 parameter: κ of the stored values upcast exactly to
float64, one rule for both paths (and the same cache entries). κ is invariant under a scale
:math:`s`: :math:`\\kappa(sW) = \\kappa(W)`, so with one scale per tensor this is κ of the
dequantized weight; with scales per row or per block (stored as separate tensors) it is κ of the
stored values, not of the dequantized weight.

Example::

    >>> table = kappatune.scan_checkpoint("path/to/model", max_dim=16384, cache="cache")
    >>> names = table.select(top_fraction=0.1)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import struct
import sys
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .refs import SAFETENSORS_DTYPES, TensorRef, default_layout
from .pipeline import scan_refs
from .table import KappaTable

__all__ = ["scan_checkpoint", "checkpoint_refs", "CheckpointError"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"

_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")


class CheckpointError(ValueError):
    """A checkpoint path that cannot be read, with what is wrong and how to fix it."""


def checkpoint_layout(name: str, shape: Sequence[int]) -> str:
    """The κ layout of a checkpoint tensor: :func:`kappatune.refs.default_layout` without a module.

    ``"flatten"`` for a 3-D tensor named ``…weight`` or containing ``conv`` (a convolution
    kernel), else ``"auto"`` (2-D → matrix, 3-D → stack of matrices, ≥ 4-D → flattened).
    """
    return default_layout(name, shape)


def _denied(path: Path, what: str = "file") -> CheckpointError:
    """The error for a path this user may not read (never reported as missing)."""
    return CheckpointError(f"{path}: permission denied: this user may not read the {what}; ask its owner to "
                           "make it readable, or run as a user who may read it")


def _check_regular(path: Path, what: str = "file") -> None:
    """Refuse what is not a regular file (a FIFO would block the reader forever)."""
    try:
        st = os.stat(path)
    except PermissionError:
        raise _denied(path, "folder it is in") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a {what}; pass the .safetensors file itself "
                              "(save a stream to a file first)")


def _check_readable(path: Path) -> None:
    """Raise the permission error for a file this user may not read.

    Asked of the OS once safetensors has failed: safetensors reports such a file as "No such file or
    directory".
    """
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    except PermissionError:
        raise _denied(path) from None
    except OSError:
        pass


def _safe_open(path: Path):
    _check_regular(path, "safetensors file")
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency of the cli extra
        raise CheckpointError("reading checkpoints needs the safetensors package: pip install safetensors") from None
    try:
        return safe_open(str(path), framework="pt")
    except OSError as e:
        _check_readable(path)
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    except Exception as e:  # safetensors.SafetensorError: the file is not a valid safetensors file
        if type(e).__name__ != "SafetensorError":
            raise
        _check_readable(path)
        hint = ""
        if path.suffix.lower() in _OTHER_WEIGHTS:
            hint = f"; {path.suffix} files are not read, save the model with save_pretrained (safetensors) first"
        elif path.suffix.lower() != ".safetensors":
            hint = "; is it a .safetensors file?"
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}){hint}") from None


def _index_weight_map(index: Path) -> Dict[str, str]:
    """The ``weight_map`` of an index file, checked: an object of name → shard file name, not empty,
    every shard a plain relative path inside the index's folder."""
    _check_regular(index, "checkpoint index")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index}: cannot read the checkpoint index ({e})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' object of name -> shard file)")
    if not wm:
        raise CheckpointError(f"{index}: the index's weight_map is empty (it names no tensor); "
                              "the checkpoint is incomplete")
    for shard in dict.fromkeys(wm.values()):
        parts = PurePosixPath(shard.replace("\\", "/")).parts
        if (not shard or PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute()
                or PureWindowsPath(shard).drive or ".." in parts):
            raise CheckpointError(f"{index}: shard {shard!r} is outside the checkpoint folder; an index may only "
                                  "name files next to it (is the index tampered with?)")
    return wm


def _read_index(index: Path) -> List[Path]:
    wm = _index_weight_map(index)
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
    if not path.is_dir():
        _check_regular(path, "safetensors file or index")
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _read_index(path / INDEX_NAME), [path / INDEX_NAME]
        if (path / WEIGHTS_NAME).exists():
            _check_regular(path / WEIGHTS_NAME, "safetensors file")
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
        try:
            found, idx = _resolve_one(Path(p).expanduser())
        except PermissionError as e:  # a folder on the way this user may not enter or list
            denied = Path(e.filename) if e.filename else Path(p)
            raise _denied(Path(p), f"folder {denied.parent}") from None
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


class SafetensorsFile:
    """One safetensors file, opened once: its header parsed once, one descriptor for all its tensors.

    :meth:`read` takes one tensor with ``pread`` into a buffer of its size (no memory map, so the
    file's pages never stay in the process). Safe to share between threads and forked processes
    (``pread`` has no shared file position).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = None
        self._offsets: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        self._header_len = 0
        self._lock = threading.Lock()

    def tensors(self) -> List[Tuple[str, str, Tuple[int, ...], int, int]]:
        """``(name, dtype code, shape, file offset, bytes)`` of every tensor, in the order of the data."""
        self._open()
        return sorted(((n, c, s, o, b) for n, (c, s, o, b) in self._offsets.items()), key=lambda t: (t[3], t[0]))

    def header_bytes(self) -> bytes:
        """The file's first ``8 + n`` bytes: the header's length and the header, verbatim."""
        fd = self._open()
        return os.pread(fd, 8 + self._header_len, 0)

    def size(self) -> int:
        """The file's size in bytes."""
        return os.fstat(self._open()).st_size

    def copy_range(self, dst: Any, offset: int, nbytes: int, chunk: int = 1 << 24) -> None:
        """Write ``nbytes`` bytes of the file from ``offset`` on to the binary stream ``dst``, in chunks."""
        fd, done = self._open(), 0
        while done < nbytes:
            data = os.pread(fd, min(chunk, nbytes - done), offset + done)
            if not data:
                raise CheckpointError(f"{self.path}: the file ended while it was being copied (truncated?)")
            dst.write(data)
            done += len(data)

    def _open(self) -> int:
        with self._lock:
            if self._fd is not None:
                return self._fd
            _check_regular(self.path, "safetensors file")
            try:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except PermissionError:
                raise _denied(self.path) from None
            try:
                size = os.fstat(fd).st_size
                head = os.pread(fd, 8, 0)
                (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
                if not 0 < n <= min(size - 8, 100 * 1024 * 1024):
                    raise CheckpointError(f"{self.path}: not a valid safetensors file (header size {n})")
                header = json.loads(os.pread(fd, n, 8))
                self._header_len = n
                start = 8 + n
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    b, e = (int(x) for x in info["data_offsets"])
                    if not 0 <= b <= e <= size - start:
                        raise CheckpointError(f"{self.path}: tensor {name!r} lies outside the file")
                    self._offsets[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]), start + b, e - b)
            except CheckpointError:
                os.close(fd)
                raise
            except (ValueError, KeyError, TypeError, OSError) as e:
                os.close(fd)
                raise CheckpointError(f"{self.path}: not a valid safetensors file ({e})") from None
            self._fd = fd
            return fd

    def read(self, name: str) -> torch.Tensor:
        fd = self._open()
        code, shape, offset, nbytes = self._offsets[name]
        dtype = getattr(torch, SAFETENSORS_DTYPES.get(code, ("",))[0], None)
        if not isinstance(dtype, torch.dtype) or sys.byteorder != "little":  # rare: through safetensors
            with _safe_open(self.path) as f:
                return f.get_tensor(name)
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {nbytes} bytes, not shape {shape} of {code}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done) if hasattr(os, "preadv") else None
            if got is None:  # pragma: no cover - platforms without preadv
                chunk = os.pread(fd, nbytes - done, offset + done)
                view[done:done + len(chunk)] = chunk
                got = len(chunk)
            if got == 0:
                raise CheckpointError(f"{self.path}: the file ends inside tensor {name!r} (truncated?)")
            done += got
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        self.close()


def _loader(file: "SafetensorsFile", name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        return file.read(name)  # the file's one descriptor (see the module docstring)

    return load


def checkpoint_refs(path_or_paths: Union[PathLike, Sequence[PathLike]]) -> List[TensorRef]:
    """One lazily loaded :class:`~kappatune.refs.TensorRef` per tensor of the checkpoint.

    Only the headers are read here; ``ref.load()`` reads that one tensor with ``pread``.

    Args:
        path_or_paths (str, os.PathLike or Sequence of them): a model folder, an index file
            (``model.safetensors.index.json``) or one or more ``.safetensors`` files.

    Raises:
        CheckpointError: a missing path, a file or folder this user may not read ("permission
            denied", never reported as missing), a folder without safetensors weights, a file that
            is not valid safetensors, an index naming a tensor its shard lacks, or a tensor name
            that appears in two files.
    """
    files, indexes = _resolve(path_or_paths)
    expected: Dict[str, Tuple[str, Path]] = {}
    for idx in indexes:
        for name, shard in _index_weight_map(idx).items():
            expected[name] = (shard, idx)
    refs: List[TensorRef] = []
    where: Dict[str, Path] = {}
    for path in files:
        handle = SafetensorsFile(path)  # the header, parsed once; the same object reads the tensors
        try:
            tensors = handle.tensors()
        except CheckpointError:
            with _safe_open(path):  # safetensors' own message for a file that is not safetensors
                pass
            raise
        for name, code, shape, _, nbytes in sorted(tensors):
            if name in where:
                raise CheckpointError(f"tensor {name!r} is in both {where[name]} and {path}; "
                                      "pass the files of one checkpoint only")
            where[name] = path
            if code not in SAFETENSORS_DTYPES:  # a code kappatune does not know: let safetensors judge the file
                with _safe_open(path):
                    pass
            dtype, floating = SAFETENSORS_DTYPES.get(code, (code.lower(), False))
            torch_dtype = getattr(torch, dtype, None) if code in SAFETENSORS_DTYPES else None
            size = torch_dtype.itemsize if isinstance(torch_dtype, torch.dtype) else None
            if size is not None and nbytes != math.prod(shape) * size:
                raise CheckpointError(f"{path}: not a valid safetensors file (tensor {name!r} has {nbytes} bytes, "
                                      f"not shape {shape} of {code})")
            refs.append(TensorRef(name=name, shape=shape, dtype=dtype, load=_loader(handle, name),
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
        path_or_paths (str, os.PathLike or Sequence of them): a model folder, an index file
            (``model.safetensors.index.json``) or one or more ``.safetensors`` files.
        **scan_kwargs: as :func:`kappatune.scan`: ``min_ndim``, ``max_dim``, ``include``,
            ``exclude``, ``cache``, ``recompute``, ``aggregate``, ``progress``, ``num_workers``.

    Tensors are read one at a time (``pread``, not memory-mapped), so peak memory stays near one
    tensor and its float64 copy. The names are the checkpoint keys, i.e. the model's
    ``named_parameters()`` for a ``save_pretrained`` checkpoint, and the cache entries are
    reused by ``kappatune.scan(model)`` on the model loaded in the checkpoint's dtype.

    Example::

        >>> table = kappatune.scan_checkpoint("SmolLM2-135M/", max_dim=16384)
        >>> table.select(param_budget=0.05)
    """
    return scan_refs(checkpoint_refs(path_or_paths), **scan_kwargs)
