"""The κ cache on disk: κ values (and Spectrum's SNR) keyed by tensor content, in one SQLite database.

An entry is found by a digest of the tensor's bytes (plus its dtype, shape and κ layout), so it is
reused only for byte-identical weights: a cache written for another model, or before fine-tuning
changed a tensor, is never used for it, and a fine-tuned model still reuses every tensor it left
unchanged. SNR entries have keys of their own, ``digest|layout|snr`` beside κ's ``digest|layout``
(:meth:`KappaCache.key`); every entry records its score and is checked against its key's
(:func:`validate_entry`), so a κ is never read as an SNR nor the reverse.

Where it lives
--------------
A **folder** (the default, :func:`default_cache_dir`) holds ``kappa_cache.sqlite``; a path ending
in ``.sqlite``, ``.sqlite3`` or ``.db`` names the database itself. It is an SQLite database
(Python's standard ``sqlite3``): a lookup reads one row and a save writes only the new rows, in
one transaction, so a large cache costs what a small one does. A path ending in ``.json`` is
refused with a ``ValueError`` saying what to pass instead.

What the cache promises
-----------------------
* **Validated on read**: every entry is checked before it is used (κ = σ_max/σ_min within rounding,
  σ_max ≥ σ_min ≥ 0, finite numbers, shape and layout consistent with the key and with the tensor
  asking for it, ``per_matrix`` one value per matrix with κ its aggregate; no JSON ``NaN``/
  ``Infinity`` literals, no duplicated fields). An entry that fails is recomputed, with one warning
  naming the file; it never fails a scan, and a save never fails one either.
* **Nothing invalid written**: a value that would not pass those checks is not stored.
* **Crash-safe**: each save is one SQLite transaction; a process killed mid-save leaves the
  previous entries intact.
* **Concurrent**: processes writing at once add up their entries (``BEGIN IMMEDIATE``, waiting
  while another process writes). A process waiting for a lock says so, and for which file.
* **Shared folders**: WAL mode on local disks, the rollback journal on network file systems (WAL
  needs memory shared by every process). Files are created with the permissions the umask allows
  (``0666 & ~umask``), as every other tool does. A file that cannot be read (permissions) is
  warned about and skipped, never treated as corrupt; a corrupt file is moved aside under a unique
  name and recomputed; a file that is not a kappatune cache, or was written by a newer kappatune,
  is never read or overwritten.
* **Read-only locations**: a database this process may not write (a read-only mount, another
  user's folder) is opened read-only (SQLite ``mode=ro``; ``immutable=1`` when a WAL database
  cannot be opened otherwise) and its entries are used; one warning says that new values will not
  be saved, and why.
* **Nothing outside the folder**: kappatune never follows a symbolic link at a file it creates or
  writes (the database, SQLite's ``-wal``/``-shm``/``-journal`` files, the lock file): such a link
  is named in a warning and the scan goes on without the cache.

Example::

    >>> cache = kappatune.KappaCache("cache")          # a folder, or a path ending in .sqlite
    >>> table = kappatune.scan(model, cache=cache)     # cold: computes and stores
    >>> table = kappatune.scan(model, cache=cache)     # warm: digests only
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import xxhash

from ._files import new_file_mode
from ._numbers import aggregate_values, decode_float, encode_float
from .refs import dtype_name, matrix_dims, num_matrices, resolve_layout

__all__ = ["KappaCache", "tensor_digest", "default_cache_dir"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CACHE_FORMAT = "kappatune-kappa-cache"
DEFAULT_FILENAME = "kappa_cache.sqlite"
_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_LOCK_TIMEOUT_S = 120.0
_LOCK_NOTICE_S = 1.0  # after this long waiting for a lock, say so
_LAYOUTS = ("matrix", "flatten", "stack")
_OTHER_SCORES = ("snr",)  # scores other than κ, each the last part of its keys (digest|layout|snr)
_RTOL = 1e-9  # "within rounding" for κ = σ_max/σ_min and for the aggregate of a stack
_EPS64 = 2.220446049250313e-16
_SQLITE_HEADER = b"SQLite format 3\x00"
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

PathLike = Union[str, bytes, "os.PathLike[str]"]


def default_cache_dir() -> Path:
    """``$KAPPATUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kappatune``, else ``~/.cache/kappatune``."""
    env = os.environ.get("KAPPATUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kappatune"


# -- digests -------------------------------------------------------------------------------------
def tensor_digest(tensor: "torch.Tensor") -> str:  # noqa: F821
    """Digest of a tensor's dtype, shape and bytes (C order), e.g. ``'xxh3_128:9f…'``.

    Args:
        tensor (torch.Tensor): any tensor; one on an accelerator is copied to the CPU for hashing.

    Uses xxHash3-128 (the ``xxhash`` package), a 128-bit digest; the algorithm's name is part of
    the digest, so a digest of another kind never matches one of these (a mismatch costs a
    recomputation, never a wrong κ).
    """
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = xxhash.xxh3_128(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return "xxh3_128:" + h.hexdigest()


# -- entries: encoding and validation ------------------------------------------------------------
class InvalidEntry(ValueError):
    """A cache entry that must not be used, with the reason."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"it holds a JSON {name} literal")  # never a valid value: κ = inf is stored as "inf"


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"its field {k!r} appears twice")  # never "the last one wins"
        out[k] = v
    return out


def _loads(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity literals and duplicated fields.

    Raises ValueError for text that is not such JSON (or nested too deeply to parse).
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None


def _number(x: Any, what: str, *, allow_inf: bool = False) -> float:
    if allow_inf and x == encode_float(math.inf):  # κ = ∞ as files write it (kappatune._numbers)
        return math.inf
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InvalidEntry(f"{what} is {x!r}, not a number")
    v = float(x)
    if not math.isfinite(v):
        raise InvalidEntry(f"{what} is {x!r}, not finite")
    return v


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= _RTOL * max(abs(a), abs(b))


def _matrix_dims(shape: Sequence[int], layout: str) -> Tuple[int, int, int]:
    """(number of matrices, m, n) of a tensor of ``shape`` analysed with ``layout`` (:mod:`kappatune.refs`)."""
    return (num_matrices(shape, layout), *matrix_dims(shape, layout))


def key_score(key: str) -> Tuple[str, str]:
    """``(layout, score)`` of a cache key: ``digest|layout`` is a κ key (``"kappa"``), and
    ``digest|layout|snr`` an SNR key (:meth:`KappaCache.key`).

    Args:
        key (str): the key.
    """
    head, _, last = key.rpartition("|")
    if last in _OTHER_SCORES:
        return head.rpartition("|")[2], last
    return last, "kappa"


def validate_entry(entry: Any, key: Optional[str] = None, *, shape: Optional[Sequence[int]] = None,
                   dtype: Optional[str] = None) -> Dict[str, Any]:
    """The entry in its stored (encoded) form, checked; raises :class:`InvalidEntry` saying why not.

    Args:
        entry (Any): a decoded entry as stored (κ may be the string ``"inf"``).
        key (Optional[str]): its key (``digest|layout``, or ``digest|layout|snr`` for an SNR); the
            layout and the score must agree (default ``None``: the score is the entry's own).
        shape (Optional[Sequence[int]]): the shape of the tensor asking for it (default ``None``).
        dtype (Optional[str]): the dtype of the tensor asking for it (default ``None``).

    Checks: every field of the right type and finite; the layout one of ``matrix``, ``flatten``,
    ``stack`` and fitting the shape; the entry's score (a ``"score"`` field, absent for κ) that of
    its key, so a κ entry is never read as an SNR nor the reverse. For κ:
    :math:`\\sigma_{\\max} \\ge \\sigma_{\\min} \\ge 0`; for a
    matrix, :math:`\\kappa = \\sigma_{\\max}/\\sigma_{\\min}` to ``1e-9`` relative, or
    :math:`\\kappa = \\infty` with :math:`\\sigma_{\\min} \\le \\sigma_{\\max}\\max(m,n)\\,\\varepsilon`
    (the rank-deficiency rule of :mod:`kappatune.kappa`); for a stack, one ``per_matrix`` value
    :math:`\\ge 1` per matrix, none above :math:`\\sigma_{\\max}/\\sigma_{\\min}`, and κ their mean
    (or maximum). For an SNR (:func:`kappatune.kappa.snr_of`): :math:`\\sigma_{\\max}`, the signal
    and noise sums and the threshold finite and :math:`\\ge 0`, the signal at most
    :math:`\\min(m,n)\\,\\sigma_{\\max}`, and
    :math:`\\mathrm{SNR} = \\text{signal}/\\text{noise}/\\sigma_{\\max}` to ``1e-9`` relative (``inf``
    for a noise sum of 0, 0 for :math:`\\sigma_{\\max} = 0`); for a stack, one ``per_matrix`` SNR
    :math:`\\ge 0` per matrix and the SNR their mean (or maximum).
    """
    if not isinstance(entry, dict):
        raise InvalidEntry(f"it is {type(entry).__name__}, not an object")
    has = entry.get("score", "kappa")
    key_layout, score = key_score(key) if key is not None else (None, has if has in _OTHER_SCORES else "kappa")
    if has != score:
        raise InvalidEntry(f"it is {_score_word(has)} entry under {_score_word(score)} key")
    layout = entry.get("layout")
    if layout not in _LAYOUTS:
        raise InvalidEntry(f"layout {layout!r} is not one of {', '.join(_LAYOUTS)}")
    if key is not None and key_layout != layout:
        raise InvalidEntry(f"layout {layout!r} differs from the key's {key_layout!r}")
    shp = entry.get("shape")
    if (not isinstance(shp, list) or not shp
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shp)):
        raise InvalidEntry(f"shape {shp!r} is not a list of positive whole numbers")
    try:
        resolve_layout(shp, layout)
        ndim_ok = True
    except ValueError:
        ndim_ok = False
    if not ndim_ok:
        raise InvalidEntry(f"shape {shp} does not fit layout {layout!r}")
    if shape is not None and tuple(shp) != tuple(int(s) for s in shape):
        raise InvalidEntry(f"shape {shp} differs from the tensor's {list(shape)}")
    dt = entry.get("dtype")
    if not isinstance(dt, str) or not dt:
        raise InvalidEntry(f"dtype {dt!r} is not a name")
    if dtype is not None and dt != dtype_name(dtype):
        raise InvalidEntry(f"dtype {dt!r} differs from the tensor's {str(dtype)!r}")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidEntry(f"name {name!r} is not a string")
    if score == "snr":
        return _validate_snr(entry, layout, shp, dt, name)
    smax = _number(entry.get("sigma_max"), "sigma_max")
    smin = _number(entry.get("sigma_min"), "sigma_min")
    if not smax >= smin >= 0:
        raise InvalidEntry(f"sigma_max {smax!r} >= sigma_min {smin!r} >= 0 does not hold")
    kappa = _number(entry.get("kappa"), "kappa", allow_inf=True)
    if kappa < 1 - _RTOL:
        raise InvalidEntry(f"kappa {kappa!r} is below 1")
    b, m, n = _matrix_dims(shp, layout)
    ratio = smax / smin if smin > 0 else math.inf
    pm = entry.get("per_matrix")
    if layout == "stack":
        if not isinstance(pm, list) or len(pm) != b:
            raise InvalidEntry(f"per_matrix must hold {b} values (one per matrix), got {pm!r:.60}")
        per = [_number(v, "per_matrix value", allow_inf=True) for v in pm]
        if any(v < 1 - _RTOL for v in per):
            raise InvalidEntry("a per_matrix value is below 1")
        if ratio != math.inf and any(v > ratio * (1 + _RTOL) for v in per):
            raise InvalidEntry("a per_matrix value exceeds sigma_max/sigma_min")
        if not (_close(kappa, aggregate_values(per, "mean")) or _close(kappa, aggregate_values(per, "max"))):
            raise InvalidEntry(f"kappa {kappa!r} is neither the mean nor the max of per_matrix")
        per_out: Optional[List[Any]] = [encode_float(v) for v in per]
    else:
        if pm is not None:
            raise InvalidEntry(f"per_matrix is given for layout {layout!r}")
        if math.isinf(kappa):
            if not (smax == 0 or smin <= smax * max(m, n) * _EPS64 * (1 + _RTOL)):
                raise InvalidEntry(f"kappa is inf but sigma_max/sigma_min = {ratio:.6g}")
        elif not _close(kappa, ratio):
            raise InvalidEntry(f"kappa {kappa:.6g} but sigma_max/sigma_min = {ratio:.6g}")
        per_out = None
    return {"kappa": encode_float(kappa), "sigma_max": smax, "sigma_min": smin, "shape": list(shp),
            "dtype": dt, "layout": layout, "per_matrix": per_out, "name": name}


def _score_word(score: Any) -> str:
    return {"kappa": "a κ", "snr": "an SNR"}.get(score, f"a {score!r}") if isinstance(score, str) else f"a {score!r}"


def _validate_snr(entry: Mapping[str, Any], layout: str, shp: List[int], dt: str, name: Optional[str]
                  ) -> Dict[str, Any]:
    """The checks of an SNR entry (:func:`validate_entry`) after the common ones."""
    smax = _number(entry.get("sigma_max"), "sigma_max")
    snr = _number(entry.get("snr"), "snr", allow_inf=True)
    if smax < 0 or snr < 0:
        raise InvalidEntry(f"sigma_max {smax!r} and snr {snr!r} must be >= 0")
    b, m, n = _matrix_dims(shp, layout)
    pm = entry.get("per_matrix")
    parts = {k: entry.get(k) for k in ("signal", "noise", "threshold")}
    if layout == "stack":
        if not isinstance(pm, list) or len(pm) != b:
            raise InvalidEntry(f"per_matrix must hold {b} values (one per matrix), got {pm!r:.60}")
        per = [_number(v, "per_matrix value", allow_inf=True) for v in pm]
        if any(v < 0 for v in per):
            raise InvalidEntry("a per_matrix value is below 0")
        if any(v is not None for v in parts.values()):
            raise InvalidEntry("signal, noise and threshold are per matrix: not given for a stack")
        if not (_close(snr, aggregate_values(per, "mean")) or _close(snr, aggregate_values(per, "max"))):
            raise InvalidEntry(f"snr {snr!r} is neither the mean nor the max of per_matrix")
        return {"score": "snr", "snr": encode_float(snr), "sigma_max": smax, "signal": None, "noise": None,
                "threshold": None, "shape": list(shp), "dtype": dt, "layout": layout,
                "per_matrix": [encode_float(v) for v in per], "name": name}
    if pm is not None:
        raise InvalidEntry(f"per_matrix is given for layout {layout!r}")
    signal, noise, tau = (_number(parts[k], k) for k in ("signal", "noise", "threshold"))
    if min(signal, noise, tau) < 0:
        raise InvalidEntry("signal, noise and threshold must be >= 0")
    if signal > min(m, n) * smax * (1 + _RTOL):
        raise InvalidEntry(f"signal {signal!r} exceeds min(m, n) * sigma_max")
    want = 0.0 if smax == 0 else (math.inf if noise == 0 else signal / noise / smax)
    if not _close(snr, want):
        raise InvalidEntry(f"snr {snr!r} but signal/noise/sigma_max = {want!r}")
    return {"score": "snr", "snr": encode_float(snr), "sigma_max": smax, "signal": signal, "noise": noise,
            "threshold": tau, "shape": list(shp), "dtype": dt, "layout": layout, "per_matrix": None, "name": name}


def _snr_fields(f: Mapping[str, Any]) -> Dict[str, Any]:
    """An SNR entry to store, from ``snr``, ``sigma_max``, ``signal``, ``noise``, ``threshold`` (NaN
    or ``None`` for a stack), ``shape``, ``dtype``, ``layout``, ``per_matrix`` and ``name``."""
    def part(x: Any) -> Optional[float]:
        return None if x is None or math.isnan(float(x)) else float(x)

    pm = f.get("per_matrix")
    return {"score": "snr", "snr": encode_float(float(f["snr"])), "sigma_max": float(f["sigma_max"]),
            "signal": part(f.get("signal")), "noise": part(f.get("noise")), "threshold": part(f.get("threshold")),
            "shape": [int(s) for s in f["shape"]], "dtype": dtype_name(f["dtype"]),
            "layout": f["layout"], "per_matrix": None if pm is None else [encode_float(float(v)) for v in pm],
            "name": f.get("name")}


def _decode(e: Mapping[str, Any]) -> dict:
    out = dict(e)
    if e.get("score") == "snr":
        out["snr"] = decode_float(e["snr"])
    else:
        out["kappa"] = decode_float(e["kappa"])
    if e.get("per_matrix") is not None:
        out["per_matrix"] = [decode_float(v) for v in e["per_matrix"]]
    return out


# -- file helpers --------------------------------------------------------------------------------
class _NotOurs(Exception):
    """The file exists but must not be read or overwritten (foreign or newer schema)."""


class _Unreadable(Exception):
    """The file exists but cannot be read (permissions): skipped, never treated as corrupt."""


class _Corrupt(Exception):
    """The file is ours by name but its content is damaged: it is moved aside and rebuilt."""


class _Symlink(Exception):
    """A file kappatune would create or write is a symbolic link: never followed (the cache is not used)."""


def _refuse_symlinks(*paths: Path) -> None:
    """Raise :class:`_Symlink` naming the first of ``paths`` that is a symbolic link (dangling or not).

    Following one would create or write a file wherever the link points, outside the cache folder.
    """
    for p in paths:
        if os.path.islink(p):
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            raise _Symlink(f"{p} is a symbolic link (to {target})")


def _move_aside(path: Path, reason: str) -> Path:
    """Rename a corrupt file to a name no other file has (``NAME.corrupt-<time>-<random>``)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    while True:
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{secrets.token_hex(4)}")
        if not os.path.lexists(aside):
            break
    os.replace(path, aside)
    logger.warning("κ cache %s was corrupt (%s); moved it to %s and starting a fresh one", path, reason, aside)
    return aside


@contextlib.contextmanager
def _file_lock(lock_path: Path, what: Path):
    """An exclusive lock on ``lock_path`` (the ``filelock`` package; the file is created
    ``0666 & ~umask``, never through a symbolic link); says so when it has to wait."""
    import filelock

    _refuse_symlinks(lock_path)
    lock = filelock.FileLock(str(lock_path), mode=new_file_mode())
    try:
        try:
            lock.acquire(timeout=_LOCK_NOTICE_S)
        except filelock.Timeout:
            logger.warning("κ cache %s: waiting for the lock %s (another kappatune is replacing a corrupt "
                           "file); giving up after %.0f s", what, lock_path, _LOCK_TIMEOUT_S)
            try:
                lock.acquire(timeout=_LOCK_TIMEOUT_S - _LOCK_NOTICE_S)
            except filelock.Timeout:
                raise TimeoutError(f"timed out after {_LOCK_TIMEOUT_S:.0f} s waiting for the lock "
                                   f"{lock_path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link made since the check above
            raise _Symlink(f"{lock_path} is a symbolic link") from None
        raise
    try:
        yield
    finally:
        lock.release()


def _read_bytes(path: Path, limit: Optional[int] = None) -> Optional[bytes]:
    """The file's bytes (the first ``limit``); ``None`` if there is none.

    Raises _Unreadable when permissions forbid reading it, _NotOurs for something that is not a
    regular file (a FIFO would block), OSError for anything else.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _NotOurs("it is not a regular file")
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as e:
        raise _Unreadable(e.strerror or str(e)) from None


# -- the SQLite store ----------------------------------------------------------------------------
def _sqlite_busy(e: Exception) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _sqlite_corrupt(e: Exception) -> bool:
    msg = str(e).lower()
    return "not a database" in msg or "malformed" in msg or "corrupt" in msg


_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "fuse.sshfs", "lustre", "gpfs", "ceph",
               "glusterfs", "fuse.glusterfs", "beegfs", "davfs", "fuse.s3fs", "fuse.gcsfuse"}


def _network_fs(path: Path) -> bool:
    """Whether ``path`` is on a network file system (Linux: by ``/proc/self/mounts``)."""
    try:
        real = os.path.realpath(path.parent)
        best, fstype = "", ""
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        return fstype in _NETWORK_FS
    except OSError:
        return False


_INHERITED: List[Any] = []  # connections a forked child must neither use nor close


def _rollback(con) -> None:
    """Roll back the open transaction, if SQLite has not already done so, never masking the error
    being raised: after "database or disk is full" SQLite has rolled back itself, and an explicit
    ROLLBACK would fail with "cannot rollback - no transaction is active" instead."""
    if con.in_transaction:
        with contextlib.suppress(Exception):
            con.execute("ROLLBACK")


def _readonly_reason(path: Path) -> Optional[str]:
    """Why this process may not write the database at ``path`` (which exists), or ``None``.

    SQLite writes the file and creates its journal (``-wal``, ``-journal``) next to it, so the
    folder must be writable too.
    """
    folder = path.parent
    try:
        if os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1):
            return "is on a read-only file system"
    except (OSError, AttributeError):  # no statvfs (Windows): the checks below decide
        pass
    kw = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    if not os.access(path, os.W_OK, **kw):
        return "may not be written by this user"
    if not os.access(folder, os.W_OK | os.X_OK, **kw):
        return f"is in a folder this user may not write to ({folder})"
    return None


class _SqliteStore:
    """``entries(key, entry)`` rows (the entry as compact JSON) in an SQLite database (WAL mode on a
    local disk, the rollback journal on a network file system)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        #: why the open database is read-only (``None``: it is writable); set by :meth:`connect`
        self.readonly: Optional[str] = None
        self._con = None
        self._pid = None

    # connection ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._con is not None:
            if self._pid == os.getpid():
                with contextlib.suppress(Exception):
                    self._con.close()
            else:
                _INHERITED.append(self._con)
        self._con = None

    def _retry(self, fn, what: str):
        """Run ``fn()``; while the database is locked by another process, wait (and say so)."""
        import sqlite3

        t0 = time.monotonic()
        told = False
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _sqlite_busy(e):
                    raise
                waited = time.monotonic() - t0
                if waited > _LOCK_TIMEOUT_S:
                    raise TimeoutError(f"timed out after {_LOCK_TIMEOUT_S:.0f} s: another process holds the "
                                       f"lock of {self.path}") from None
                if not told and waited > _LOCK_NOTICE_S:
                    logger.warning("κ cache %s: waiting to %s: another process holds its write lock (another "
                                   "kappatune saving, or one stopped while saving); giving up after %.0f s",
                                   self.path, what, _LOCK_TIMEOUT_S)
                    told = True
                time.sleep(0.05)

    def connect(self):
        """The open connection (opened, checked and initialised on first use, again after a fork)."""
        if self._con is not None and self._pid == os.getpid():
            return self._con
        if self._con is not None:  # inherited through fork: never closed here (SQLite forbids using it)
            _INHERITED.append(self._con)
        self._con = None
        con = self._open()
        self._con, self._pid = con, os.getpid()
        return con

    def _open(self):
        import sqlite3

        # SQLite follows links (and puts its -wal/-shm next to the target): refuse them all.
        _refuse_symlinks(self.path, *(Path(str(self.path) + c) for c in _SQLITE_COMPANIONS), self.lock_path)
        head = _read_bytes(self.path, limit=len(_SQLITE_HEADER))
        self.readonly = None if head is None else _readonly_reason(self.path)
        if self.readonly is not None:
            if head and head != _SQLITE_HEADER:
                raise _Unreadable(f"it is not an SQLite database, and it {self.readonly}")
            try:
                return self._connect_checked(sqlite3)
            except _Corrupt as e:
                raise _Unreadable(f"it is damaged ({e}), and it {self.readonly}") from None
        if head is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create()
        elif head and head != _SQLITE_HEADER:  # an empty file is a valid empty database
            self._rebuild("it is not an SQLite database", self._inode())
        try:
            ino = self._inode()
            con = self._connect_checked(sqlite3)
        except _Corrupt as e:
            self._rebuild(str(e), ino)
            con = self._connect_checked(sqlite3)
        return con

    def _create(self) -> None:
        """An empty database file, ``0666 & ~umask`` (SQLite's -wal/-shm copy its mode); never through
        a link (``O_EXCL`` does not follow one)."""
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666))
        except FileExistsError:
            _refuse_symlinks(self.path)  # a link made since the check in _open; else another process made it

    def _inode(self) -> Optional[Tuple[int, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _rebuild(self, reason: str, ino: Optional[Tuple[int, int]]) -> None:
        """Move a corrupt database aside and start an empty one (under a lock; unless another
        process has already replaced the file that was found corrupt)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_path, self.path):
            if ino is not None and self._inode() == ino:
                _move_aside(self.path, reason)
                for suffix in _SQLITE_COMPANIONS:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(self.path) + suffix)
            self._create()

    def _connect_checked(self, sqlite3):
        if self.readonly is not None:
            con = self._connect_readonly(sqlite3)
        else:
            try:
                con = sqlite3.connect(str(self.path), timeout=_LOCK_NOTICE_S, isolation_level=None,
                                      check_same_thread=False)
            except sqlite3.OperationalError as e:
                raise _Unreadable(str(e)) from None
        try:
            self._retry(lambda: self._init(con), "open it")
        except sqlite3.DatabaseError as e:
            con.close()
            if _sqlite_corrupt(e):
                raise _Corrupt(str(e)) from None
            raise _Unreadable(str(e)) from None
        except BaseException:
            con.close()
            raise
        return con

    def _connect_readonly(self, sqlite3):
        """A read-only connection (``mode=ro``: nothing is written, not even a journal).

        A WAL database whose ``-shm`` file is gone (closed cleanly) cannot be opened that way where
        the folder is not writable (SQLite would create the ``-shm``): it is then opened with
        ``immutable=1``, which reads the database file alone, without locks. That is safe for a
        cache: a value another process commits meanwhile is not seen (it is recomputed here), and a
        page read while another process rewrote it fails validation or raises, which turns the
        cache off with a warning; a wrong κ is never used.
        """
        from urllib.parse import quote

        uri = "file:" + quote(os.path.abspath(self.path)) + "?mode=ro"
        con = None
        try:
            con = sqlite3.connect(uri, uri=True, timeout=_LOCK_NOTICE_S, isolation_level=None,
                                  check_same_thread=False)
            self._retry(lambda: con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone(), "open it")
            return con
        except sqlite3.DatabaseError as e:  # "unable to open database file": the -shm cannot be made
            if con is not None:
                con.close()
            if _sqlite_corrupt(e):
                raise _Corrupt(str(e)) from None
        try:
            con = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as e:
            raise _Unreadable(str(e)) from None
        self.readonly += " (opened as immutable: values other processes save meanwhile are not seen)"
        return con

    def _init(self, con) -> None:
        import sqlite3

        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if "readonly" in str(e).lower():
                    raise _Unreadable("the database is empty and read-only") from None
                raise
            try:
                con.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
                con.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, entry TEXT NOT NULL)"
                            " WITHOUT ROWID")
                con.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('schema_version', ?)",
                            (CACHE_FORMAT, str(SCHEMA_VERSION)))
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
            tables = {"meta", "entries"}
        if not {"meta", "entries"} <= tables:
            raise _NotOurs("it is an SQLite database of another program")
        meta = dict(con.execute("SELECT k, v FROM meta"))
        if meta.get("format") != CACHE_FORMAT:
            raise _NotOurs("it is an SQLite database of another program")
        try:
            version = int(meta.get("schema_version", ""))
        except (TypeError, ValueError):  # TypeError: a NULL in a table made by hand
            raise _Corrupt("it has no integer schema_version") from None
        if version > SCHEMA_VERSION:
            raise _NotOurs(f"it was written by a newer kappatune (schema {version} > {SCHEMA_VERSION})")
        # Only now that it is known to be ours: WAL (readers never wait for a writer) and NORMAL
        # synchronisation (a killed process never loses a committed save).
        # WAL needs shared memory between the processes, so one host: on a network file system
        # (NFS, SMB, ...) the rollback journal is used instead, with full synchronisation.
        network = _network_fs(self.path)
        with contextlib.suppress(sqlite3.OperationalError):  # read-only: keep the journal mode it has
            con.execute("PRAGMA journal_mode=DELETE" if network else "PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL" if network else "PRAGMA synchronous=NORMAL")

    def get_many(self, keys: Sequence[str]) -> Dict[str, str]:
        con = self.connect()
        out: Dict[str, str] = {}
        for i in range(0, len(keys), 500):
            chunk = list(keys[i:i + 500])
            q = f"SELECT key, entry FROM entries WHERE key IN ({','.join('?' * len(chunk))})"
            out.update(self._retry(lambda: con.execute(q, chunk).fetchall(), "read it"))
        return out

    def put_many(self, items: Mapping[str, dict]) -> None:
        con = self.connect()
        rows = [(k, _dumps(e)) for k, e in items.items()]

        def write():
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?)", rows)
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise

        self._retry(write, "save")

    def keys(self) -> List[str]:
        con = self.connect()
        rows = self._retry(lambda: con.execute("SELECT key FROM entries").fetchall(), "read it")
        return [r[0] for r in rows if isinstance(r[0], str)]  # a table made by hand may hold other types

    def count(self) -> int:
        con = self.connect()
        return int(self._retry(lambda: con.execute("SELECT COUNT(*) FROM entries").fetchone()[0], "read it"))


def _dumps(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, allow_nan=False, separators=(",", ":"))


# -- the public class ----------------------------------------------------------------------------
class KappaCache:
    """κ values on disk, reused only for byte-identical tensors (see the module docstring).

    Args:
        path (str, bytes or os.PathLike, optional): a folder (its ``kappa_cache.sqlite`` is used) or
            a path ending in ``.sqlite``, ``.sqlite3`` or ``.db`` (that database). Default: ``None``,
            :func:`default_cache_dir`.

    Use :meth:`get` / :meth:`put` with keys from :meth:`key`, then :meth:`save`.
    :func:`kappatune.scan` does all of this for you. Nothing here raises for a bad, unreadable,
    foreign or locked file, or a symbolic link where the cache would create a file: it warns (naming
    the file) and the scan goes on without it. A database this process may not write is read (one
    warning says new values are not saved).

    Raises:
        ValueError: ``path`` ends in ``.json`` (the κ cache is an SQLite database), or is an
            existing file whose name ends otherwise than in ``.sqlite``, ``.sqlite3`` or ``.db``.
    """

    def __init__(self, path: Optional[PathLike] = None) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        p = Path(path).expanduser() if path is not None else default_cache_dir()
        suffix = "" if p.is_dir() else p.suffix.lower()  # an existing folder is a folder, whatever its name
        if suffix == ".json":
            raise ValueError(f"cache path {str(p)!r} ends in .json, but the κ cache is an SQLite database: pass a "
                             f"folder (it keeps {DEFAULT_FILENAME}) or a path ending in .sqlite")
        if suffix in _SQLITE_SUFFIXES:
            self.path = p
        elif p.exists() and not p.is_dir():
            raise ValueError(f"cache path {str(p)!r} is an existing file that does not end in .sqlite, .sqlite3 "
                             "or .db; pass a folder or a .sqlite file path")
        else:
            self.path = p / DEFAULT_FILENAME
        self._sql = _SqliteStore(self.path)
        self._new: Dict[str, dict] = {}
        self._bad: set = set()
        self._loaded = False
        self._usable = True     # entries on disk can be read
        self._writable = True   # the file may be written
        self._warned_bad = False
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_sql"] = _SqliteStore(self.path)  # no open connection
        return state

    def __del__(self) -> None:
        # no module globals here: at interpreter shutdown they may already be None
        sql = self.__dict__.get("_sql")
        if sql is not None:
            try:
                sql.close()
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass

    # -- keys and entries --------------------------------------------------------------
    @staticmethod
    def key(digest: str, layout: str, score: str = "kappa") -> str:
        """Cache key of a tensor: its content digest, the layout used and the score.

        Args:
            digest (str): :func:`tensor_digest` of the tensor.
            layout (str): ``"matrix"``, ``"flatten"`` or ``"stack"``.
            score (str, optional): ``"kappa"`` (key ``digest|layout``, as written by every
                kappatune) or ``"snr"`` (key ``digest|layout|snr``). Default: ``"kappa"``.
        """
        if score == "kappa":
            return f"{digest}|{layout}"
        if score not in _OTHER_SCORES:
            raise ValueError(f"score must be 'kappa' or one of {', '.join(map(repr, _OTHER_SCORES))}, got {score!r}")
        return f"{digest}|{layout}|{score}"

    def get(self, key: str, *, shape: Optional[Sequence[int]] = None, dtype: Optional[str] = None) -> Optional[dict]:
        """The decoded entry for ``key`` (κ values as floats), or ``None``.

        Args:
            key (str): from :meth:`key`.
            shape (Optional[Sequence[int]]): the shape of the tensor asking; an entry of another shape
                is not used (default ``None``: not checked).
            dtype (Optional[str]): the tensor's dtype name, checked likewise (default ``None``).

        An entry that fails :func:`validate_entry` is not used (the tensor is recomputed and the
        fresh value replaces it at :meth:`save`), with one warning naming the file.
        """
        return self.get_many([key], shapes=None if shape is None else [shape],
                             dtypes=None if dtype is None else [dtype]).get(key)

    def get_many(self, keys: Sequence[str], *, shapes: Optional[Sequence[Optional[Sequence[int]]]] = None,
                 dtypes: Optional[Sequence[Optional[str]]] = None) -> Dict[str, dict]:
        """:meth:`get` for many keys at once (one query): ``{key: entry}`` for the usable ones.

        Args:
            keys (Sequence[str]): keys from :meth:`key`.
            shapes (Optional[Sequence]): per key, the shape of the tensor asking (or ``None``).
            dtypes (Optional[Sequence]): per key, its dtype name (or ``None``).
        """
        raw = self._raw_many(keys)
        out: Dict[str, dict] = {}
        for i, k in enumerate(keys):
            e = raw.get(k)
            if e is not None:
                try:
                    e = validate_entry(e, k, shape=shapes[i] if shapes else None,
                                       dtype=dtypes[i] if dtypes else None)
                except InvalidEntry as why:
                    self._reject(k, e, why)
                    e = None
            if e is None:
                self.misses += 1
            else:
                self.hits += 1
                out[k] = _decode(e)
        return out

    def _raw_many(self, keys: Sequence[str]) -> Dict[str, Any]:
        """Entries as stored (not yet validated against the asking tensor)."""
        self._ensure_loaded()
        found: Dict[str, Any] = {k: self._new[k] for k in keys if k in self._new}
        rest = [k for k in dict.fromkeys(keys) if k not in found and k not in self._bad]
        if not rest or not self._usable:
            return found
        try:
            rows = self._sql.get_many(rest)
        except Exception as e:  # a database that fails mid-use: go on without it
            self._disable(f"cannot be read ({e})")
            return found
        for k, text in rows.items():
            if not isinstance(text, str):  # a table made by hand, without TEXT affinity: 3, 2.5, NULL, a blob
                self._reject(k, text, InvalidEntry(f"it is stored as {type(text).__name__}, not as JSON text"))
                continue
            try:
                found[k] = _loads(text)
            except ValueError as why:
                self._reject(k, text, why)
        return found

    def _reject(self, key: str, entry: Any, why: Exception) -> None:
        self._bad.add(key)
        name = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else None
        if not self._warned_bad:
            self._warned_bad = True
            logger.warning("κ cache %s: entry %s is malformed or inconsistent (%s); recomputing it (and any "
                           "other such entry, logged at debug level)", self.path, name or key, why)
        else:
            logger.debug("κ cache %s: entry %s is malformed or inconsistent (%s)", self.path, name or key, why)

    def put(self, key: str, *, kappa: float, sigma_max: float, sigma_min: float, shape, dtype: str,
            layout: str, per_matrix=None, name: Optional[str] = None) -> None:
        """Record an entry in memory; :meth:`save` writes it.

        An entry that would not pass :func:`validate_entry` (a NaN, say) is not recorded: it is
        logged, and never makes a later save fail.

        Args:
            key (str): from :meth:`key`, ``digest|layout`` (a κ entry; use :meth:`put_many` for an
                SNR key).
            kappa (float): :math:`\\kappa = \\sigma_{\\max}/\\sigma_{\\min}` (``inf`` for a
                rank-deficient matrix); for a ``"stack"``, the aggregate of ``per_matrix``.
            sigma_max (float): the largest singular value :math:`\\sigma_{\\max}` (over the stack).
            sigma_min (float): the smallest singular value :math:`\\sigma_{\\min}` (over the stack).
            shape (Sequence[int]): the tensor's shape.
            dtype (str or torch.dtype): the tensor's dtype, stored by its name (e.g. ``"bfloat16"``).
            layout (str): ``"matrix"``, ``"flatten"`` or ``"stack"``, as in ``key``.
            per_matrix (Sequence[float], optional): κ of each matrix of a ``"stack"``. Default:
                ``None`` (a single matrix).
            name (str, optional): the tensor's name, kept for messages only (the key is the
                content). Default: ``None``.
        """
        self.put_many({key: dict(kappa=kappa, sigma_max=sigma_max, sigma_min=sigma_min, shape=shape, dtype=dtype,
                                 layout=layout, per_matrix=per_matrix, name=name)})

    def put_many(self, entries: Mapping[str, Mapping[str, Any]]) -> int:
        """:meth:`put` for ``{key: fields}``; returns how many entries were recorded.

        Under an SNR key (``digest|layout|snr``) the fields are those of an SNR result: ``snr``,
        ``sigma_max``, ``signal``, ``noise``, ``threshold`` (NaN for a stack), ``shape``, ``dtype``,
        ``layout``, ``per_matrix`` (the SNR of each matrix of a stack) and ``name``.

        Args:
            entries (Mapping[str, Mapping[str, Any]]): per key from :meth:`key`, the fields of
                :meth:`put` (``kappa``, ``sigma_max``, ``sigma_min``, ``shape``, ``dtype``, ``layout``,
                optional ``per_matrix`` and ``name``), or under an SNR key those above.
        """
        self._ensure_loaded()
        n = 0
        for key, f in entries.items():
            try:
                pm = f.get("per_matrix")
                if key_score(key)[1] == "snr":
                    raw = _snr_fields(f)
                    self._new[key] = validate_entry(raw, key)
                    self._bad.discard(key)
                    n += 1
                    continue
                raw = {
                    "kappa": encode_float(float(f["kappa"])),
                    "sigma_max": float(f["sigma_max"]), "sigma_min": float(f["sigma_min"]),
                    "shape": [int(s) for s in f["shape"]], "dtype": dtype_name(f["dtype"]),
                    "layout": f["layout"],
                    "per_matrix": None if pm is None else [encode_float(float(v)) for v in pm],
                    "name": f.get("name"),
                }
                self._new[key] = validate_entry(raw, key)
                self._bad.discard(key)
                n += 1
            except (InvalidEntry, KeyError, TypeError, ValueError) as e:
                logger.warning("κ cache %s: not storing the entry of %s (%s)", self.path, f.get("name") or key, e)
        return n

    def __len__(self) -> int:
        return len(self._all_keys())

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        raw = self._raw_many([key]).get(key)
        if raw is None:
            return False
        try:
            validate_entry(raw, key)
        except InvalidEntry:
            return False
        return True

    def keys(self) -> Iterator[str]:
        """Every key, sorted (entries on disk and new ones)."""
        return iter(sorted(self._all_keys()))

    def _all_keys(self) -> set:
        self._ensure_loaded()
        on_disk: List[str] = []
        if self._usable:
            try:
                on_disk = self._sql.keys()
            except Exception as e:
                self._disable(f"cannot be read ({e})")
        return (set(on_disk) - self._bad) | set(self._new)

    def clear_memory(self) -> None:
        """Forget what is held in memory (the file stays); the next access reads it again."""
        self._new, self._bad, self._loaded = {}, set(), False
        self._usable = self._writable = True
        self._sql.close()

    def __repr__(self) -> str:
        n = len(self) if self._loaded else "?"
        return f"KappaCache(path={str(self.path)!r}, entries={n})"

    # -- file I/O ----------------------------------------------------------------------
    def _disable(self, why: str, *, write: bool = False) -> None:
        logger.warning("κ cache %s %s: going on without it%s. Pass another cache_dir (or fix the file).",
                       self.path, why, "" if write else " (it is neither used nor written)")
        self._usable = False
        self._writable = write

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            self._sql.connect()
            if self._sql.readonly is not None:
                logger.warning("κ cache %s %s: using the values it holds, but new κ values will not be saved. "
                               "Pass a writable cache_dir (or set KAPPATUNE_CACHE_DIR) to keep them.",
                               self.path, self._sql.readonly)
                self._writable = False
        except _Symlink as e:
            self._refuse_link(e)
        except _NotOurs as e:
            logger.warning("κ cache %s is not used and will not be overwritten: %s. "
                           "Pass another cache_dir.", self.path, e)
            self._usable = self._writable = False
        except _Unreadable as e:
            self._disable(f"cannot be read ({e}); ask its owner to make it readable and writable")
        except _Corrupt as e:  # still damaged once moved aside and rebuilt
            logger.warning("κ cache %s is corrupt (%s): ignoring it, κ will be recomputed", self.path, e)
        except Exception as e:  # an OS or SQLite error opening it: never fails a scan
            self._disable(f"could not be opened ({type(e).__name__}: {e})")

    def _refuse_link(self, e: _Symlink) -> None:
        logger.warning("κ cache %s: %s; kappatune never follows a symbolic link for a file it creates or writes "
                       "(that could put files outside the cache folder): going on without the cache. Remove the "
                       "link, or pass the real path as the cache.", self.path, e)
        self._usable = self._writable = False

    def save(self) -> bool:
        """Write the new entries (merged with what is on disk). Returns True if written.

        A read-only location, a foreign or unreadable file, a lock time-out or any other failure
        gives a warning and returns False: the κ values are still in memory and the scan result is
        unaffected.
        """
        self._ensure_loaded()
        if not self._new:
            return True
        if not self._writable:
            return False
        try:
            try:
                self._sql.put_many(self._new)
            except _NotOurs as e:
                logger.warning("κ cache %s not written: %s", self.path, e)
                self._writable = False
                return False
            except _Unreadable as e:
                self._disable(f"cannot be read ({e})")
                return False
            except _Symlink as e:
                self._refuse_link(e)
                return False
        except Exception as e:  # OSError, TimeoutError, sqlite3.Error, ...: never fails the scan
            logger.warning("κ cache %s could not be written (%s); continuing without saving. "
                           "Pass a writable cache_dir or set KAPPATUNE_CACHE_DIR.", self.path, e)
            return False
        self._bad -= set(self._new)
        self._new = {}
        return True
