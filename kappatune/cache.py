"""On-disk κ cache keyed by tensor content.

An entry is found by a digest of the tensor's bytes (plus its dtype, shape and κ layout), so it is
reused only for byte-identical weights: a cache written for another model, or before fine-tuning
changed a tensor, is never used for it, and a fine-tuned model still reuses every tensor it left
unchanged.

The same cache holds Spectrum's SNR (``kappatune.scan(model, score="snr")``) under keys of their
own, ``digest|layout|snr`` beside κ's ``digest|layout`` (:meth:`KappaCache.key`); every entry
records its score and is checked against its key's (:func:`validate_entry`), so a κ is never read
as an SNR nor the reverse. Files written before SNR entries existed are read as they are (their
keys are κ keys), and an earlier kappatune never uses an SNR entry: the last part of its key is not
a layout, so that version rejects it (and leaves it out when it rewrites a ``.json`` cache).

Stores
------
* A **folder** (the default, :func:`default_cache_dir`) holds ``kappa_cache.sqlite``, an SQLite
  database in WAL mode (Python's standard ``sqlite3``): a lookup reads one row and a save writes
  only the new rows, in one transaction, so a cache of 100 000 entries costs what a small one does.
  A ``kappa_cache.json`` written by an earlier kappatune in the same folder is imported once (again
  only if that file changes). A path ending in ``.sqlite``, ``.sqlite3`` or ``.db`` names the
  database itself.
* A path ending in **.json** keeps one JSON file (the format of earlier versions, and the
  reference kappaTune's ``condition_file`` argument): every save merges with the file under a lock
  and replaces it atomically, so its cost grows with the file. Use a folder for large caches.

What the cache promises
-----------------------
* **Validated on read**: every entry is checked before it is used (κ = σ_max/σ_min within rounding,
  σ_max ≥ σ_min ≥ 0, finite numbers, shape and layout consistent with the key and with the tensor
  asking for it, ``per_matrix`` one value per matrix with κ its aggregate; no JSON ``NaN``/
  ``Infinity`` literals, no duplicate keys). An entry that fails is recomputed, with one warning
  naming the file; it never fails a scan, and a save never fails one either.
* **Crash-safe**: a process killed mid-save leaves the previous entries intact (an SQLite
  transaction; for JSON an atomic rename, and the temporary file it leaves is removed by the next
  save).
* **Concurrent**: processes writing at once add up their entries (SQLite locking; for JSON a lock
  file). A process waiting for a lock says so, and for which file.
* **Shared folders**: files are created with the permissions the umask allows (``0666 & ~umask``),
  as every other tool does. A file that cannot be read (permissions) is warned about and skipped,
  never treated as corrupt; a corrupt file is moved aside under a unique name and recomputed; a
  file that is not a kappatune cache, or was written by a newer kappatune, is never read or
  overwritten.
* **Read-only locations**: a database this process may not write (a read-only mount, another
  user's folder) is opened read-only (SQLite ``mode=ro``; ``immutable=1`` when a WAL database
  cannot be opened otherwise) and its entries are used; one warning says that new values will not
  be saved, and why.
* **Nothing outside the folder**: kappatune never follows a symbolic link at a file it creates or
  writes (the cache file, SQLite's ``-wal``/``-shm``/``-journal`` files, the lock files): such a
  link is named in a warning and the scan goes on without the cache.

Example::

    >>> cache = kappatune.KappaCache("cache")          # folder, or a path ending in .json
    >>> table = kappatune.scan(model, cache=cache)     # cold: computes and stores
    >>> table = kappatune.scan(model, cache=cache)     # warm: digests only
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["KappaCache", "tensor_digest", "default_cache_dir", "SCHEMA_VERSION", "CACHE_FORMAT",
           "validate_entry", "InvalidEntry", "key_score"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CACHE_FORMAT = "kappatune-kappa-cache"
DEFAULT_FILENAME = "kappa_cache.sqlite"
LEGACY_FILENAME = "kappa_cache.json"
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
def _digest_fn():
    try:
        import xxhash  # ~20 GB/s; a dependency of kappatune, but digests work without it

        def xxh(header: bytes, data: memoryview) -> str:
            h = xxhash.xxh3_128(header)
            h.update(data)
            return "xxh3_128:" + h.hexdigest()

        return xxh
    except ImportError:  # stdlib fallback: BLAKE2b-128, a cryptographic hash (~1 GB/s)

        def b2(header: bytes, data: memoryview) -> str:
            h = hashlib.blake2b(header, digest_size=16)
            h.update(data)
            return "blake2b128:" + h.hexdigest()

        return b2


_DIGEST = None


def tensor_digest(tensor: "torch.Tensor") -> str:  # noqa: F821
    """Digest of a tensor's dtype, shape and bytes (C order), e.g. ``'xxh3_128:9f…'``.

    Args:
        tensor (torch.Tensor): any tensor; one on an accelerator is copied to the CPU for hashing.

    Uses xxHash3-128 (the ``xxhash`` package, a dependency), else BLAKE2b-128 from the standard
    library; both are 128-bit digests (no crafted collision is known for either on tensors of this
    kind; BLAKE2b is cryptographic). The algorithm is part of the digest, so digests of the two kinds
    never match each other (a mismatch costs a recomputation, never a wrong κ).
    """
    global _DIGEST
    if _DIGEST is None:
        _DIGEST = _digest_fn()
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    header = f"{t.dtype}|{tuple(t.shape)}|".encode()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else memoryview(b"")
    return _DIGEST(header, memoryview(data))


# -- entries: encoding and validation ------------------------------------------------------------
class InvalidEntry(ValueError):
    """A cache entry that must not be used, with the reason."""


class _Marker:
    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return self.what


_NON_FINITE = _Marker("a JSON NaN/Infinity literal")
_DUPLICATE = _Marker("a duplicated JSON key")


def _parse_constant(name: str) -> Any:
    return _NON_FINITE  # NaN, Infinity, -Infinity: never a valid value (we write κ = inf as "inf")


def _pairs(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        out[k] = _DUPLICATE if k in out else v  # detected, never "last one wins"
    return out


def _loads(text: str) -> Any:
    """``json.loads`` that marks NaN/Infinity literals and duplicate keys instead of accepting them.

    Raises ValueError for text that is not JSON (or nested too deeply to parse).
    """
    try:
        return json.loads(text, parse_constant=_parse_constant, object_pairs_hook=_pairs)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None


def _number(x: Any, what: str, *, allow_inf: bool = False) -> float:
    if allow_inf and x == "inf":
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
    """(number of matrices, m, n) of a tensor of ``shape`` analysed with ``layout``."""
    if layout == "stack":
        return shape[0], shape[1], shape[2]
    if layout == "flatten":
        return 1, shape[0], math.prod(shape[1:])
    return 1, shape[0], shape[1]


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
        entry (Any): a decoded JSON object as stored (κ may be the string ``"inf"``).
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
    if entry is _DUPLICATE:
        raise InvalidEntry("its key appears twice in the file (duplicate key)")
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
    ndim_ok = {"matrix": len(shp) == 2, "stack": len(shp) == 3, "flatten": len(shp) >= 2}[layout]
    if not ndim_ok:
        raise InvalidEntry(f"shape {shp} does not fit layout {layout!r}")
    if shape is not None and tuple(shp) != tuple(int(s) for s in shape):
        raise InvalidEntry(f"shape {shp} differs from the tensor's {list(shape)}")
    dt = entry.get("dtype")
    if not isinstance(dt, str) or not dt:
        raise InvalidEntry(f"dtype {dt!r} is not a name")
    if dtype is not None and dt != str(dtype).replace("torch.", ""):
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
        mean = math.inf if any(math.isinf(v) for v in per) else math.fsum(per) / len(per)
        if not (_close(kappa, mean) or _close(kappa, max(per))):
            raise InvalidEntry(f"kappa {kappa!r} is neither the mean nor the max of per_matrix")
        per_out: Optional[List[Any]] = [_encode_float(v) for v in per]
    else:
        if pm is not None:
            raise InvalidEntry(f"per_matrix is given for layout {layout!r}")
        if math.isinf(kappa):
            if not (smax == 0 or smin <= smax * max(m, n) * _EPS64 * (1 + _RTOL)):
                raise InvalidEntry(f"kappa is inf but sigma_max/sigma_min = {ratio:.6g}")
        elif not _close(kappa, ratio):
            raise InvalidEntry(f"kappa {kappa:.6g} but sigma_max/sigma_min = {ratio:.6g}")
        per_out = None
    return {"kappa": _encode_float(kappa), "sigma_max": smax, "sigma_min": smin, "shape": list(shp),
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
        mean = math.inf if any(math.isinf(v) for v in per) else math.fsum(per) / len(per)
        if not (_close(snr, mean) or _close(snr, max(per))):
            raise InvalidEntry(f"snr {snr!r} is neither the mean nor the max of per_matrix")
        return {"score": "snr", "snr": _encode_float(snr), "sigma_max": smax, "signal": None, "noise": None,
                "threshold": None, "shape": list(shp), "dtype": dt, "layout": layout,
                "per_matrix": [_encode_float(v) for v in per], "name": name}
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
    return {"score": "snr", "snr": _encode_float(snr), "sigma_max": smax, "signal": signal, "noise": noise,
            "threshold": tau, "shape": list(shp), "dtype": dt, "layout": layout, "per_matrix": None, "name": name}


def _snr_fields(f: Mapping[str, Any]) -> Dict[str, Any]:
    """An SNR entry to store, from ``snr``, ``sigma_max``, ``signal``, ``noise``, ``threshold`` (NaN
    or ``None`` for a stack), ``shape``, ``dtype``, ``layout``, ``per_matrix`` and ``name``."""
    def part(x: Any) -> Optional[float]:
        return None if x is None or math.isnan(float(x)) else float(x)

    pm = f.get("per_matrix")
    return {"score": "snr", "snr": _encode_float(float(f["snr"])), "sigma_max": float(f["sigma_max"]),
            "signal": part(f.get("signal")), "noise": part(f.get("noise")), "threshold": part(f.get("threshold")),
            "shape": [int(s) for s in f["shape"]], "dtype": str(f["dtype"]).replace("torch.", ""),
            "layout": f["layout"], "per_matrix": None if pm is None else [_encode_float(float(v)) for v in pm],
            "name": f.get("name")}


def _encode_float(x: float) -> Union[float, str]:
    return "inf" if math.isinf(x) else float(x)


def _decode_float(x: Any) -> float:
    return math.inf if x == "inf" else float(x)


def _decode(e: Mapping[str, Any]) -> dict:
    out = dict(e)
    if e.get("score") == "snr":
        out["snr"] = _decode_float(e["snr"])
    else:
        out["kappa"] = _decode_float(e["kappa"])
    if e.get("per_matrix") is not None:
        out["per_matrix"] = [_decode_float(v) for v in e["per_matrix"]]
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


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _new_file_mode(existing: Optional[Path] = None) -> int:
    """``0666 & ~umask``, widened by the bits an existing file already grants (never narrower)."""
    mode = 0o666 & ~_umask()
    if existing is not None:
        with contextlib.suppress(OSError):
            mode |= stat.S_IMODE(existing.stat().st_mode)
    return mode


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
    """An exclusive lock on ``lock_path`` (created ``0666 & ~umask``, never through a symbolic link);
    says so when it has to wait."""
    _refuse_symlinks(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link made since the check above
            raise _Symlink(f"{lock_path} is a symbolic link") from None
        raise
    try:
        t0 = time.monotonic()
        told = False
        while True:
            try:
                if os.name == "nt":  # pragma: no cover - exercised on Windows only
                    import msvcrt

                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
                    raise
            waited = time.monotonic() - t0
            if waited > _LOCK_TIMEOUT_S:
                raise TimeoutError(f"timed out after {_LOCK_TIMEOUT_S:.0f} s waiting for the lock {lock_path}")
            if not told and waited > _LOCK_NOTICE_S:
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    pid = int(os.pread(fd, 32, 0).split()[0])
                    holder = f" held by process {pid}"
                logger.warning("κ cache %s: waiting for the lock %s%s (another kappatune is saving, or was "
                               "stopped while saving); giving up after %.0f s", what, lock_path, holder,
                               _LOCK_TIMEOUT_S)
                told = True
            time.sleep(0.02)
        with contextlib.suppress(OSError):  # who holds it, for the message of a waiting process
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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


# -- the JSON store ------------------------------------------------------------------------------
class _JsonStore:
    """One JSON file; every save merges with it under a lock and replaces it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.entries: Dict[str, dict] = {}
        self.malformed = 0

    def read(self, quiet: bool = False, validate: bool = True) -> Dict[str, Any]:
        """Entries on disk. Raises _NotOurs, _Unreadable or _Corrupt.

        ``validate``: only the valid ones, in their normalised form (what a save writes back);
        else as parsed, for lookups, which validate each entry they use. ``quiet``: no warning
        about invalid entries.
        """
        _refuse_symlinks(self.path, self.lock_path)
        raw = _read_bytes(self.path)
        if raw is None:
            return {}
        try:
            data = _loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise _Corrupt(str(e)) from None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            if isinstance(data, dict) and data.get("format") is _DUPLICATE:
                raise _Corrupt("its 'format' key is duplicated")
            raise _NotOurs("it is not a kappatune κ cache")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise _Corrupt("it has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise _NotOurs(f"it was written by a newer kappatune (schema {version} > {SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            logger.warning("κ cache %s has old schema %d (current %d): ignoring its entries; "
                           "they will be recomputed and the file rewritten", self.path, version, SCHEMA_VERSION)
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise _Corrupt("its 'entries' is not an object" + (" (the key is duplicated)"
                                                                if entries is _DUPLICATE else ""))
        if not validate:
            return entries
        good: Dict[str, dict] = {}
        first = ""
        for k, e in entries.items():
            try:
                if e is _DUPLICATE:
                    raise InvalidEntry("its key appears twice in the file (duplicate key)")
                good[k] = validate_entry(e, k)
            except InvalidEntry as why:
                if not first:
                    name = e.get("name") if isinstance(e, dict) and isinstance(e.get("name"), str) else k
                    first = f"{name}: {why}"
        bad = len(entries) - len(good)
        self.malformed = bad
        if bad and not quiet:
            logger.warning("κ cache %s: ignoring %d malformed or inconsistent entr%s (first: %s); they will be "
                           "recomputed", self.path, bad, "y" if bad == 1 else "ies", first)
        return good

    def write(self, new: Mapping[str, dict]) -> Dict[str, dict]:
        """Merge ``new`` into the file under the lock; returns the merged entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_path, self.path):
            self._remove_orphans()
            try:
                on_disk = self.read(quiet=True)
            except _Corrupt as e:
                _move_aside(self.path, str(e))
                on_disk = {}
            merged = {**on_disk, **new}
            self._write_atomic(merged)
        return merged

    def _remove_orphans(self) -> None:
        """Temporary files of writers killed mid-save (only a lock holder writes one)."""
        for p in self.path.parent.glob(self.path.name + ".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                logger.info("κ cache %s: removed %s, left by a save that was interrupted", self.path, p.name)

    def _write_atomic(self, entries: Mapping[str, dict]) -> None:
        payload = {"format": CACHE_FORMAT, "schema_version": SCHEMA_VERSION,
                   "entries": dict(sorted(entries.items()))}
        text = json.dumps(payload, allow_nan=False, separators=(",", ":"))  # fails before any file exists
        mode = _new_file_mode(self.path if self.path.exists() else None)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), mode)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


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
    """``entries(key, entry)`` rows (the entry as compact JSON) in an SQLite database in WAL mode."""

    def __init__(self, path: Path, legacy_json: Optional[Path]) -> None:
        self.path = path
        self.legacy = legacy_json
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
        if self.legacy is not None and self.readonly is None:
            self._import_legacy(con)
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

    def _import_legacy(self, con) -> None:
        """Entries of ``kappa_cache.json`` in the same folder, once per version of that file."""
        assert self.legacy is not None
        try:
            st = os.stat(self.legacy)
        except OSError:
            return
        sig = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        row = con.execute("SELECT v FROM meta WHERE k='imported_json'").fetchone()
        if row is not None and row[0] == sig:
            return
        store = _JsonStore(self.legacy)
        try:
            entries = store.read()
        except (_NotOurs, _Unreadable, _Corrupt) as e:
            logger.warning("κ cache %s: not importing %s (%s)", self.path, self.legacy, e)
            entries = {}

        def write():
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?)",
                                ((k, _dumps(e)) for k, e in entries.items()))
                con.execute("INSERT OR REPLACE INTO meta VALUES ('imported_json', ?)", (sig,))
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise

        import sqlite3

        try:
            self._retry(write, f"import {self.legacy.name}")
        except (sqlite3.Error, TimeoutError) as e:
            logger.warning("κ cache %s: could not import %s (%s)", self.path, self.legacy, e)
            return
        if entries:
            logger.info("κ cache %s: imported %d entries from %s", self.path, len(entries), self.legacy)

    # entries -------------------------------------------------------------------------------
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
        path (str, bytes or os.PathLike, optional): a folder (its ``kappa_cache.sqlite`` is used, and
            a ``kappa_cache.json`` there is imported once), a path ending in ``.sqlite``/``.db`` (that
            database), or a path ending in ``.json`` (one JSON file, merged and replaced on every
            save). Default ``None``: :func:`default_cache_dir`.

    Use :meth:`get` / :meth:`put` with keys from :meth:`key`, then :meth:`save`.
    :func:`kappatune.scan` does all of this for you. Nothing here raises for a bad, unreadable,
    foreign or locked file, or a symbolic link where the cache would create a file: it warns (naming
    the file) and the scan goes on without it. A database this process may not write is read (one
    warning says new values are not saved).
    """

    def __init__(self, path: Optional[PathLike] = None) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        p = Path(path).expanduser() if path is not None else default_cache_dir()
        suffix = "" if p.is_dir() else p.suffix.lower()  # an existing folder is a folder, whatever its name
        self._json: Optional[_JsonStore] = None
        self._sql: Optional[_SqliteStore] = None
        if suffix == ".json":
            self.path = p
            self._json = _JsonStore(p)
        elif suffix in _SQLITE_SUFFIXES:
            self.path = p
            self._sql = _SqliteStore(p, None)
        else:
            if p.exists() and not p.is_dir():
                raise ValueError(
                    f"cache path {str(p)!r} is an existing file that does not end in .json, .sqlite or .db; "
                    "pass a folder, a .sqlite file or a .json file path"
                )
            self.path = p / DEFAULT_FILENAME
            self._sql = _SqliteStore(self.path, p / LEGACY_FILENAME)
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
        if state.get("_sql") is not None:
            state["_sql"] = _SqliteStore(self._sql.path, self._sql.legacy)  # no open connection
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
        if self._json is not None:
            found.update((k, self._json.entries[k]) for k in rest if k in self._json.entries)
            return found
        try:
            rows = self._sql.get_many(rest)  # type: ignore[union-attr]
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
        """
        self.put_many({key: dict(kappa=kappa, sigma_max=sigma_max, sigma_min=sigma_min, shape=shape, dtype=dtype,
                                 layout=layout, per_matrix=per_matrix, name=name)})

    def put_many(self, entries: Mapping[str, Mapping[str, Any]]) -> int:
        """:meth:`put` for ``{key: fields}``; returns how many entries were recorded.

        Under an SNR key (``digest|layout|snr``) the fields are those of an SNR result: ``snr``,
        ``sigma_max``, ``signal``, ``noise``, ``threshold`` (NaN for a stack), ``shape``, ``dtype``,
        ``layout``, ``per_matrix`` (the SNR of each matrix of a stack) and ``name``.
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
                    "kappa": _encode_float(float(f["kappa"])),
                    "sigma_max": float(f["sigma_max"]), "sigma_min": float(f["sigma_min"]),
                    "shape": [int(s) for s in f["shape"]], "dtype": str(f["dtype"]).replace("torch.", ""),
                    "layout": f["layout"],
                    "per_matrix": None if pm is None else [_encode_float(float(v)) for v in pm],
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
        on_disk: Iterable[str] = ()
        if self._usable:
            if self._json is not None:
                on_disk = self._json.entries
            else:
                try:
                    on_disk = self._sql.keys()  # type: ignore[union-attr]
                except Exception as e:
                    self._disable(f"cannot be read ({e})")
        return (set(on_disk) - self._bad) | set(self._new)

    def clear_memory(self) -> None:
        """Forget what is held in memory (the file stays); the next access reads it again."""
        self._new, self._bad, self._loaded = {}, set(), False
        self._usable = self._writable = True
        if self._json is not None:
            self._json.entries = {}
        if self._sql is not None:
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
            if self._json is not None:
                self._json.entries = self._json.read(validate=False)  # each entry checked when used
            else:
                self._sql.connect()  # type: ignore[union-attr]
                if self._sql.readonly is not None:  # type: ignore[union-attr]
                    logger.warning("κ cache %s %s: using the values it holds, but new κ values will not be saved. "
                                   "Pass a writable cache_dir (or set KAPPATUNE_CACHE_DIR) to keep them.",
                                   self.path, self._sql.readonly)  # type: ignore[union-attr]
                    self._writable = False
        except _Symlink as e:
            self._refuse_link(e)
        except _NotOurs as e:
            logger.warning("κ cache %s is not used and will not be overwritten: %s. "
                           "Pass another cache_dir.", self.path, e)
            self._usable = self._writable = False
        except _Unreadable as e:
            self._disable(f"cannot be read ({e}); ask its owner to make it readable and writable")
        except _Corrupt as e:  # JSON: moved aside and rewritten at the next save
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
                self._write_entries(self._new)
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

    def _write_entries(self, new: Mapping[str, dict]) -> None:
        """Write the validated new entries to the store (one transaction, or one locked JSON rewrite)."""
        if self._json is not None:
            self._json.entries = self._json.write(new)
        else:
            self._sql.put_many(new)  # type: ignore[union-attr]
