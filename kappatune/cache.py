"""On-disk κ cache keyed by tensor content.

An entry is found by a digest of the tensor's bytes (plus its dtype, shape and κ layout), so it is
reused only for byte-identical weights: a cache written for another model, or before fine-tuning
changed a tensor, is never used for it, and a fine-tuned model still reuses every tensor it left
unchanged. One JSON file (``kappa_cache.json``) holds every model's entries.

Writes merge with what is on disk under a file lock and replace the file atomically, so concurrent
runs add up their entries and a crash mid-write leaves the previous file intact. A corrupt file is
moved aside with a warning (and recomputed); a file that is not a kappatune cache, or was written
by a newer kappatune, is never read or overwritten.

Example::

    >>> cache = kappatune.KappaCache("cache")          # folder, or a path ending in .json
    >>> table = kappatune.scan(model, cache=cache)     # cold: computes and stores
    >>> table = kappatune.scan(model, cache=cache)     # warm: digests only
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

import torch

__all__ = ["KappaCache", "tensor_digest", "default_cache_dir", "SCHEMA_VERSION", "CACHE_FORMAT"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CACHE_FORMAT = "kappatune-kappa-cache"
DEFAULT_FILENAME = "kappa_cache.json"
_LOCK_TIMEOUT_S = 120.0
_REQUIRED = {"kappa": (int, float, str), "sigma_max": (int, float), "sigma_min": (int, float),
             "shape": list, "dtype": str, "layout": str}

PathLike = Union[str, "os.PathLike[str]"]


def default_cache_dir() -> Path:
    """``$KAPPATUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kappatune``, else ``~/.cache/kappatune``."""
    env = os.environ.get("KAPPATUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kappatune"


def _digest_fn():
    try:
        import xxhash  # optional: ~20 GB/s

        def xxh(header: bytes, data: memoryview) -> str:
            h = xxhash.xxh3_128(header)
            h.update(data)
            return "xxh3_128:" + h.hexdigest()

        return xxh
    except ImportError:  # stdlib fallback: ~1.3 GB/s, 64 bits from two independent checksums

        def z64(header: bytes, data: memoryview) -> str:
            c = zlib.crc32(data, zlib.crc32(header))
            a = zlib.adler32(data, zlib.adler32(header))
            return f"crc32-adler32:{c:08x}{a:08x}"

        return z64


_DIGEST = None


def tensor_digest(tensor: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and bytes (C order), e.g. ``'xxh3_128:9f…'``.

    Uses xxHash3-128 when the ``xxhash`` package is installed (``pip install kappatune[fast]``),
    else CRC-32 + Adler-32 from the standard library. The algorithm is part of the digest, so
    digests of the two kinds never match each other (a mismatch costs a recomputation, never a
    wrong κ). A tensor on an accelerator is copied to the CPU for hashing.
    """
    global _DIGEST
    if _DIGEST is None:
        _DIGEST = _digest_fn()
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    header = f"{t.dtype}|{tuple(t.shape)}|".encode()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else memoryview(b"")
    return _DIGEST(header, memoryview(data))


def _encode_float(x: float) -> Union[float, str]:
    return "inf" if math.isinf(x) else float(x)


def _decode_float(x: Any) -> float:
    if isinstance(x, str):
        if x != "inf":
            raise ValueError(x)
        return math.inf
    return float(x)


def _valid_entry(e: Any) -> bool:
    if not isinstance(e, dict):
        return False
    for k, types in _REQUIRED.items():
        if not isinstance(e.get(k), types):
            return False
    try:
        _decode_float(e["kappa"])
        pm = e.get("per_matrix")
        if pm is not None:
            [_decode_float(v) for v in pm]
    except (ValueError, TypeError):
        return False
    return True


class _NotOurs(Exception):
    """The file exists but must not be read or overwritten (foreign or newer schema)."""


class KappaCache:
    """κ values on disk, reused only for byte-identical tensors.

    Args:
        path: a folder (the file ``kappa_cache.json`` inside it is used) or a path to a ``.json``
            file. ``None`` uses :func:`default_cache_dir`.

    Use :meth:`get` / :meth:`put` with keys from :meth:`key`, then :meth:`save`, which merges
    with the file on disk under a lock and replaces it atomically. :func:`kappatune.scan` does
    all of this for you.
    """

    def __init__(self, path: Optional[PathLike] = None) -> None:
        p = Path(path).expanduser() if path is not None else default_cache_dir()
        if p.suffix.lower() == ".json":
            self.path = p
        else:
            if p.exists() and not p.is_dir():
                raise ValueError(
                    f"cache path {str(p)!r} is an existing file that does not end in .json; "
                    "pass a folder or a .json file path"
                )
            self.path = p / DEFAULT_FILENAME
        self._entries: Dict[str, dict] = {}
        self._new: Dict[str, dict] = {}
        self._loaded = False
        self._writable = True
        self.hits = 0
        self.misses = 0

    # -- keys and entries --------------------------------------------------------------
    @staticmethod
    def key(digest: str, layout: str) -> str:
        """Cache key of a tensor: its content digest and the κ layout used."""
        return f"{digest}|{layout}"

    def get(self, key: str) -> Optional[dict]:
        """The decoded entry for ``key`` (κ values as floats), or ``None``."""
        self._ensure_loaded()
        e = self._new.get(key) or self._entries.get(key)
        if e is None:
            self.misses += 1
            return None
        self.hits += 1
        out = dict(e)
        out["kappa"] = _decode_float(e["kappa"])
        if e.get("per_matrix") is not None:
            out["per_matrix"] = [_decode_float(v) for v in e["per_matrix"]]
        return out

    def put(self, key: str, *, kappa: float, sigma_max: float, sigma_min: float, shape, dtype: str,
            layout: str, per_matrix=None, name: Optional[str] = None) -> None:
        """Record an entry in memory; :meth:`save` writes it."""
        self._ensure_loaded()
        entry = {
            "kappa": _encode_float(kappa),
            "sigma_max": float(sigma_max),
            "sigma_min": float(sigma_min),
            "shape": [int(s) for s in shape],
            "dtype": str(dtype),
            "layout": layout,
            "per_matrix": None if per_matrix is None else [_encode_float(v) for v in per_matrix],
            "name": name,
        }
        self._new[key] = entry

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(set(self._entries) | set(self._new))

    def __contains__(self, key: object) -> bool:
        self._ensure_loaded()
        return key in self._new or key in self._entries

    def keys(self) -> Iterator[str]:
        self._ensure_loaded()
        return iter(sorted(set(self._entries) | set(self._new)))

    def clear_memory(self) -> None:
        """Forget the loaded entries (the file stays); the next access reloads it."""
        self._entries, self._new, self._loaded = {}, {}, False

    def __repr__(self) -> str:
        n = len(self) if self._loaded else "?"
        return f"KappaCache(path={str(self.path)!r}, entries={n})"

    # -- file I/O ----------------------------------------------------------------------
    def _read(self) -> Dict[str, dict]:
        """Entries on disk. Raises _NotOurs for a foreign/newer file, ValueError for a corrupt one."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ValueError(f"cannot read: {e}") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise _NotOurs("it is not a kappatune κ cache")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ValueError("it has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise _NotOurs(f"it was written by a newer kappatune (schema {version} > {SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            logger.warning("κ cache %s has old schema %d (current %d): ignoring its entries; "
                           "they will be recomputed and the file rewritten", self.path, version, SCHEMA_VERSION)
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise ValueError("its 'entries' is not an object")
        good = {k: e for k, e in entries.items() if isinstance(k, str) and _valid_entry(e)}
        if len(good) != len(entries):
            logger.warning("κ cache %s: ignoring %d malformed entr(ies); they will be recomputed",
                           self.path, len(entries) - len(good))
        return good

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            self._entries = self._read()
        except _NotOurs as e:
            logger.warning("κ cache %s is not used and will not be overwritten: %s. "
                           "Pass another cache_dir.", self.path, e)
            self._entries, self._writable = {}, False
        except ValueError as e:
            logger.warning("κ cache %s is corrupt (%s): ignoring it, κ will be recomputed", self.path, e)
            self._entries = {}

    @contextlib.contextmanager
    def _lock(self):
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            if os.name == "nt":  # pragma: no cover - exercised on Windows only
                import msvcrt

                while True:
                    try:
                        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"timed out waiting for the lock {lock_path}")
                        time.sleep(0.05)
            else:
                import fcntl

                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"timed out waiting for the lock {lock_path}")
                        time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def save(self) -> bool:
        """Merge new entries into the file on disk (locked, atomic). Returns True if written.

        A read-only location, a foreign file or a lock time-out gives a warning and returns False:
        the κ values are still in memory and the scan result is unaffected.
        """
        self._ensure_loaded()
        if not self._new:
            return True
        if not self._writable:
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock():
                try:
                    on_disk = self._read()
                except _NotOurs as e:
                    logger.warning("κ cache %s not written: %s", self.path, e)
                    self._writable = False
                    return False
                except ValueError as e:
                    aside = self.path.with_name(self.path.name + f".corrupt-{int(time.time())}")
                    os.replace(self.path, aside)
                    logger.warning("κ cache %s was corrupt (%s); moved it to %s and writing a fresh one",
                                   self.path, e, aside)
                    on_disk = {}
                merged = {**on_disk, **self._new}
                self._write_atomic(merged)
        except (OSError, TimeoutError) as e:
            logger.warning("κ cache %s could not be written (%s); continuing without saving. "
                           "Pass a writable cache_dir or set KAPPATUNE_CACHE_DIR.", self.path, e)
            return False
        self._entries = merged
        self._new = {}
        return True

    def _write_atomic(self, entries: Mapping[str, dict]) -> None:
        payload = {
            "format": CACHE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "entries": dict(sorted(entries.items())),
        }
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, allow_nan=False, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
