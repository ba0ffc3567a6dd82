"""The results folder of a study: checked before anything is written, claims that cannot be held
twice, run files that are used only when whole.

Layout of ``--out``::

    study.json        the study file (settings, analysis rules) and the fingerprints of the model,
                      the corpora and the token windows; written once, before the first run
    base.json         the untouched model's losses on every evaluation window
    selections.json   the tensors each arm trains, per seed (fixed at the first start)
    runs/<run>.json   one file per finished run, written atomically
    claims/<run>.claim   the worker training a run: pid, host, token, heartbeat
    results.md, summary.json, *.png   the report

**Fingerprints first.** :meth:`ResultsFolder.check` compares this command's settings, model and
corpora with ``study.json`` and refuses a mismatch with one line saying what differs, before
anything is written; a folder that holds other files and no study is refused too.

**Claims.** A worker claims a run by writing its claim to a temporary name and hard-linking it into
place (``os.link`` fails if the name exists), so a claim file is never seen empty or half-written.
The holder refreshes a heartbeat timestamp in it (:meth:`Claim.start_heartbeat`); a claim is stale
when its process is gone (same host) or its heartbeat is older than ``stale_after`` seconds (a hung
worker, a pid reused by another process, another host), and a stale claim is taken over. On POSIX
every claim transition is serialised by ``flock`` on ``claims/.lock``.

**Run files.** A run file that is not a JSON object, lacks ``run_id`` or its curve, names another
run, or holds a malformed task-2 block (or none, for a run that should have gone on to task 2) is
reported and redone (the file is moved aside, never deleted, never used); a whole run file
made under other settings is refused, never mixed in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .._files import write_atomic

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["ResultsFolder", "FolderError"]

STUDY_FILE = "study.json"
RUN_REQUIRED = ("run_id", "arm", "seed", "lr", "decay", "curve", "final", "settings_fingerprint",
                "model_fingerprint", "data_fingerprint")
"""Keys every run file must hold to be used."""
TASK2_FINAL = ("task_final_loss", "control_final_loss", "task2_final_loss")
"""Keys the final evaluation of a run's ``task2`` block must hold."""
_OURS = {"study.json", "base.json", "selections.json", "runs", "claims", "results.md", "summary.json", "tmp"}


class FolderError(ValueError):
    """A results folder that cannot be used as asked: one line naming the file and the fix."""


# ----------------------------------------------------------------------------------------------
# files
def atomic_write_json(path: Path, obj: Any, exclusive: bool = False, strict: bool = False) -> bool:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file in the same folder, then a
    rename (or, with ``exclusive``, a hard link that fails when ``path`` exists); kappatune's one
    file writer (``kappatune._files.write_atomic``).

    Args:
        path (Path): the file.
        obj: a JSON-able value.
        exclusive (bool, optional): never replace an existing file. Default: ``False``.
        strict (bool, optional): refuse NaN/inf (strict JSON). Default: ``False``.

    Returns:
        bool: ``False`` when ``exclusive`` and the file already existed (nothing written).
    """
    data = json.dumps(obj, separators=(",", ":"), allow_nan=not strict).encode("utf-8")
    return write_atomic(Path(path), data, exclusive=exclusive)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (readers,
    and other workers writing the same report, never see half a file)."""
    write_atomic(Path(path), bytes(data))


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; :class:`FolderError` naming the file (and line) otherwise."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FolderError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FolderError(f"{path}: cannot read it ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise FolderError(f"{path} line {e.lineno}: not JSON ({e.msg})") from None


def _writable(path: Path) -> bool:
    """Whether files can be created in the folder ``path``: ``os.access`` (the permission bits) and a
    probe file (a read-only file system refuses even root)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".kappatune-probe.")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


def check_out(path: Path, need_write: bool = True) -> None:
    """Refuse an unusable ``--out`` with one line: a regular file (or anything not a folder), a
    read-only folder, or a new folder whose nearest existing parent is not a writable folder.
    Creates nothing.

    Args:
        path (Path): the results folder.
        need_write (bool, optional): the command will write into it. Default: ``True``.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FolderError(f"--out {p}: is a file, not a folder; give a folder (new or a study's results)")
    if not need_write:
        if not p.is_dir():
            raise FolderError(f"--out {p}: no such folder")
        return
    if p.is_dir():
        if not _writable(p):
            raise FolderError(f"--out {p}: the folder is read-only; give a folder you can write to "
                              "(or --report with a writable copy)")
        return
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FolderError(f"--out {p}: {parent} is a file, not a folder")
    if not _writable(parent):
        raise FolderError(f"--out {p}: cannot create it ({parent} is read-only)")


# ----------------------------------------------------------------------------------------------
# claims
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                       # alive, another user's
        return True
    except OSError:
        return False
    return True


@dataclass
class Claim:
    """A run held by this worker. Release it with :meth:`release` (or use it as a context manager).

    Attributes:
        path (Path): the claim file.
        token (str): this claim's unique token.
        lost (bool): another worker took the run over (this worker's heartbeat went stale).
    """

    folder: "ResultsFolder"
    run_id: str
    path: Path
    token: str
    lost: bool = False
    _stop: Optional[threading.Event] = None
    _thread: Optional[threading.Thread] = None

    def heartbeat(self) -> bool:
        """Refresh the heartbeat timestamp; ``False`` (and :attr:`lost`) if the claim is no longer ours."""
        with self.folder.claims_lock():
            cur = self.folder.read_claim(self.run_id)
            if cur.get("token") != self.token:
                self.lost = True
                return False
            cur["heartbeat"] = time.time()
            atomic_write_json(self.path, cur)
            return True

    def start_heartbeat(self, interval: float = 15.0) -> None:
        """Refresh the heartbeat every ``interval`` seconds from a daemon thread until :meth:`release`."""
        if self._thread is not None:
            return
        self._stop = threading.Event()

        def beat() -> None:
            assert self._stop is not None
            while not self._stop.wait(interval):
                try:
                    if not self.heartbeat():
                        return
                except OSError:                   # a transient file-system error: try again next beat
                    continue

        self._thread = threading.Thread(target=beat, name=f"kappatune-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """Whether the claim file still holds this claim's token."""
        return self.folder.read_claim(self.run_id).get("token") == self.token

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still ours."""
        if self._stop is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
        with self.folder.claims_lock():
            if self.folder.read_claim(self.run_id).get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# the folder
class ResultsFolder:
    """The results folder of one study (see the module docstring).

    Args:
        path (str or Path): the folder (``--out``).
        stale_after (float, optional): seconds without a heartbeat after which a claim is stale.
            Default: ``120``.
    """

    def __init__(self, path: "str | Path", stale_after: float = 120.0) -> None:
        self.path = Path(path)
        self.stale_after = float(stale_after)

    # -- paths -----------------------------------------------------------------------------------
    @property
    def study_file(self) -> Path:
        """``study.json``."""
        return self.path / STUDY_FILE

    @property
    def runs_dir(self) -> Path:
        """``runs/``."""
        return self.path / "runs"

    @property
    def claims_dir(self) -> Path:
        """``claims/``."""
        return self.path / "claims"

    def run_path(self, run_id: str) -> Path:
        """Where the run file of a run is (whether or not it exists).

        Args:
            run_id (str): the run's id (:attr:`~kappatune.study.plan.RunSpec.run_id`).

        Returns:
            Path: ``runs/<run_id>.json`` in the folder.
        """
        return self.runs_dir / f"{run_id}.json"

    # -- the study file and the fingerprints -----------------------------------------------------
    def manifest(self) -> Optional[Dict[str, Any]]:
        """The content of ``study.json``, or ``None`` when the folder holds no study yet."""
        if not self.study_file.exists():
            return None
        d = read_json(self.study_file)
        if not isinstance(d, dict) or not isinstance(d.get("study"), dict) or not isinstance(d.get("fingerprints"),
                                                                                            dict):
            raise FolderError(f"{self.study_file}: not a kappatune study manifest; move it away or use another --out")
        return d

    def check(self, settings: Mapping[str, Any], analysis: Mapping[str, Any], fingerprints: Mapping[str, Any],
              compare_analysis: bool = True, own: Sequence[Any] = ()) -> Optional[Dict[str, Any]]:
        """Compare this command with the folder's study; nothing is written.

        Args:
            settings (mapping): :meth:`StudyConfig.run_settings` of this command.
            analysis (mapping): :meth:`StudyConfig.analysis_rules` of this command.
            fingerprints (mapping): ``model`` and ``corpora`` (``{role: fingerprint}``, compared over the
                roles of both this command and the folder), and ``windows`` when known; a key missing here
                is not compared.
            compare_analysis (bool, optional): refuse other analysis rules too. Default: ``True``.
            own (sequence of path, optional): files of this study that may already be in a new folder
                (its study file and its pre-registration, committed there before the first run).
                Default: ``()``.

        Returns:
            dict or None: the folder's manifest, ``None`` for a new (or empty) folder.

        Raises:
            FolderError: a folder holding other files and no study, or a study whose settings, model,
                corpora or analysis differ (one line saying what). The run settings are compared over
                the keys of both sides (:attr:`StudyConfig.RUN_KEYS`, and :attr:`StudyConfig.TASK2_KEYS`
                where either has task 2): a setting one side lacks reads ``null``.
        """
        man = self.manifest()
        if man is None:
            if self.path.is_dir():
                mine = {Path(f).resolve() for f in own if f}
                other = sorted(p.name for p in self.path.iterdir() if not p.name.startswith(".") and
                               p.name not in _OURS and p.resolve() not in mine)
                if other:
                    raise FolderError(f"--out {self.path}: the folder holds other files ({', '.join(other[:3])}"
                                      f"{' …' if len(other) > 3 else ''}) and no study; give an empty or new folder")
                if any((self.path / n).exists() for n in ("runs", "base.json", "selections.json")):
                    raise FolderError(f"--out {self.path}: holds run files but no {STUDY_FILE}; it was not made by "
                                      "kappatune study (or the file was removed): use another --out")
            return None
        from .config import StudyConfig, differences

        old = man["study"]
        fp = man["fingerprints"]
        # every run setting on either side: the folder's task-2 settings count when this command has none
        keys = set(settings) | {k for k in StudyConfig.RUN_KEYS if k in old}
        if old.get("task2_steps"):
            keys |= {k for k in StudyConfig.TASK2_KEYS if k in old}
        old_settings = {k: old.get(k) for k in keys}
        now = {k: settings.get(k) for k in keys}
        if old_settings != now:
            raise FolderError(f"--out {self.path} holds a study with other settings "
                              f"({differences(old_settings, now)}); use another --out, or the same settings to "
                              "resume")
        if "model" in fingerprints and fp.get("model") != fingerprints["model"]:
            raise FolderError(f"--out {self.path}: the model differs from the one its runs used (weights "
                              f"fingerprint {fingerprints['model']} now vs {fp.get('model')}: {old.get('model')!r} "
                              "was changed or is another model); use another --out")
        if "corpora" in fingerprints:                     # every corpus role of the command and of the folder
            now_c, was_c = dict(fingerprints["corpora"] or {}), dict(fp.get("corpora") or {})
            for role in [*now_c, *(r for r in was_c if r not in now_c)]:
                f, was = now_c.get(role), was_c.get(role)
                if was != f:
                    files = ((old.get("corpora") or {}).get(role) or {}).get("files") or []
                    where = f" ({', '.join(files[:2])})" if files else ""
                    if f is None:
                        raise FolderError(f"--out {self.path}: its runs used a {role} corpus{where} (content "
                                          f"fingerprint {was}) that this command does not give; give it again or use "
                                          "another --out")
                    raise FolderError(f"--out {self.path}: the {role} corpus{where} differs from the one its runs "
                                      f"used (content fingerprint {f} now vs {was}); restore it or use another --out")
        if fingerprints.get("windows") and fp.get("windows") and fp["windows"] != fingerprints["windows"]:
            raise FolderError(f"--out {self.path}: the token windows differ from the ones its runs used (fingerprint "
                              f"{fingerprints['windows']} now vs {fp['windows']}: another tokenizer?); use another "
                              "--out")
        if compare_analysis:
            old_rules = {k: old.get(k) for k in analysis}
            if dict(old_rules) != dict(analysis):
                raise FolderError(f"--out {self.path} declares other analysis rules ({differences(old_rules, analysis)}"
                                  f"); they were fixed before the first run: resume without changing them, or amend "
                                  f"{self.study_file} by hand (the report says so)")
        return man

    def create(self, study: Mapping[str, Any], fingerprints: Mapping[str, Any], extra: Mapping[str, Any]) -> bool:
        """Write ``study.json`` once, creating the folder if needed; an existing file is never replaced.

        Args:
            study (mapping): the study file's content (:meth:`StudyConfig.to_dict`), stored under ``study``.
            fingerprints (mapping): ``model``, ``corpora`` (``{role: fingerprint}``) and ``windows``,
                what :meth:`check` compares a later command with.
            extra (mapping): further top-level keys (the analysis and settings fingerprints, the
                command, the kappatune version, the corpora's descriptions, …).

        Returns:
            bool: ``True`` when this call wrote the file, ``False`` when it already existed (another
                worker may have just written it: read it with :meth:`manifest` and :meth:`check` it).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        man = {"format": "kappatune-study-folder", "version": 1, "study": dict(study),
               "fingerprints": dict(fingerprints), **dict(extra)}
        return atomic_write_json(self.study_file, man, exclusive=True, strict=True)

    def prepare(self) -> None:
        """Create ``runs/`` and ``claims/`` (after :meth:`check` and :meth:`create`)."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.claims_dir.mkdir(parents=True, exist_ok=True)

    def read_checked(self, name: str, check: Callable[[Any], Optional[str]]) -> Any:
        """The content of a JSON file of the folder, checked to belong to this study.

        Args:
            name (str): the file, relative to the folder (e.g. ``base.json``).
            check (callable): ``check(content)`` returns a message when the content does not belong to
                this study (e.g. other fingerprints), ``None`` when it does.

        Returns:
            Any: the file's JSON value.

        Raises:
            FolderError: a file that is missing, unreadable or not JSON, or one ``check`` refuses (its
                message, and the fix).
        """
        p = self.path / name
        d = read_json(p)
        why = check(d)
        if why:
            raise FolderError(f"{p}: {why}; move it away or use another --out")
        return d

    def write_once(self, name: str, obj: Any, check: Callable[[Any], Optional[str]]) -> Any:
        """Write ``obj`` to a JSON file of the folder unless the file exists (atomically, never replacing
        one another worker wrote first).

        Args:
            name (str): the file, relative to the folder (e.g. ``selections.json``).
            obj (Any): the JSON-able value to write.
            check (callable): applied to an existing file's content (:meth:`read_checked`): a message
                when it does not belong to this study, ``None`` when it does.

        Returns:
            Any: what the file holds: ``obj`` when this call wrote it, else the earlier worker's content.

        Raises:
            FolderError: an existing file that cannot be read or that ``check`` refuses.
        """
        p = self.path / name
        if atomic_write_json(p, obj, exclusive=True):
            return obj
        return self.read_checked(name, check)

    # -- claims ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def claims_lock(self) -> Iterator[None]:
        """Serialise claim transitions between processes (``flock`` on ``claims/.lock``; a no-op where
        ``fcntl`` is missing)."""
        if fcntl is None:
            yield
            return
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.claims_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                           # closing the descriptor releases the lock

    def read_claim(self, run_id: str) -> Dict[str, Any]:
        """The content of a run's claim file.

        Args:
            run_id (str): the run's id.

        Returns:
            dict: the claim (``run_id``, ``pid``, ``host``, ``token``, ``started``, ``heartbeat``);
                ``{}`` when there is no claim file; ``{"torn": True}`` when it cannot be read or is
                not a JSON object.
        """
        p = self.claims_dir / f"{run_id}.claim"
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"torn": True}
        return d if isinstance(d, dict) else {"torn": True}

    def claim_stale(self, claim: Mapping[str, Any], path: Optional[Path] = None) -> bool:
        """Whether a claim may be taken over: its process is gone (this host), or its heartbeat is
        older than ``stale_after`` seconds (a hung worker, a reused pid, another host).

        Args:
            claim (mapping): the claim's content (:meth:`read_claim`).
            path (Path, optional): the claim file; a torn or empty claim is stale when the file's
                modification time is older than ``stale_after`` seconds, or the file is gone.
                Default: ``None`` (a torn or empty claim is stale).

        Returns:
            bool: ``True`` when the claim may be taken over.
        """
        now = time.time()
        if claim.get("torn") or not claim:
            try:
                return path is None or now - path.stat().st_mtime > self.stale_after
            except FileNotFoundError:
                return True
        hb = claim.get("heartbeat")
        old = not isinstance(hb, (int, float)) or not math.isfinite(hb) or now - hb > self.stale_after
        if claim.get("host") == socket.gethostname():
            pid = claim.get("pid")
            if not isinstance(pid, int) or not _pid_alive(pid):
                return True
        return old

    def claim(self, run_id: str) -> Optional[Claim]:
        """Claim a run for this worker.

        The claim is written to a temporary name and hard-linked into place (exclusive); a stale claim
        (:meth:`claim_stale`) is moved aside and the link retried.

        Args:
            run_id (str): the run's id.

        Returns:
            Claim or None: the claim (release it, or use it as a context manager), ``None`` when another
                live worker holds the run.
        """
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        path = self.claims_dir / f"{run_id}.claim"
        token = uuid.uuid4().hex
        me = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "token": token,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}
        with self.claims_lock():
            for _ in range(3):
                if atomic_write_json(path, me, exclusive=True):
                    return Claim(self, run_id, path, token)
                cur = self.read_claim(run_id)
                if not self.claim_stale(cur, path):
                    return None
                tomb = self.claims_dir / f".{run_id}.{token}.stale"
                try:
                    os.rename(path, tomb)
                except FileNotFoundError:
                    continue
                moved = {}
                with contextlib.suppress(OSError, ValueError):
                    moved = json.loads(tomb.read_text(encoding="utf-8"))
                if isinstance(moved, dict) and moved.get("token") != cur.get("token") and not cur.get("torn"):
                    with contextlib.suppress(OSError):   # not the stale claim we judged: put it back
                        os.link(tomb, path)
                    with contextlib.suppress(OSError):
                        tomb.unlink()
                    return None
                with contextlib.suppress(OSError):
                    tomb.unlink()
        return None

    # -- runs ------------------------------------------------------------------------------------
    def run_problem(self, run_id: str, d: Any, task2_arms: Sequence[str] = ()) -> Optional[str]:
        """Why the content of a run file cannot be used: not a JSON object, a missing key of
        :data:`RUN_REQUIRED`, another run's id, a missing or malformed curve (each point needs ``step``,
        ``task_curve_pw`` and ``control_curve_pw``), no final evaluation, a malformed ``task2`` block
        (an object with a final evaluation holding :data:`TASK2_FINAL` and a curve whose points hold
        ``step``, ``task_curve_pw``, ``control_curve_pw`` and ``task2_curve_pw``), or a run of an arm of
        ``task2_arms`` that did not diverge on the task but has no ``task2`` block.

        Args:
            run_id (str): the run the file is named after.
            d (Any): the file's JSON value.
            task2_arms (sequence of str, optional): the arms whose runs go on to task 2 (empty: the
                study has no task 2). Default: ``()``.

        Returns:
            str or None: the reason, ``None`` when the run can be used.
        """
        if not isinstance(d, dict):
            return f"holds a JSON {type(d).__name__}, not a run object"
        missing = [k for k in RUN_REQUIRED if k not in d]
        if missing:
            return f"lacks {', '.join(missing[:4])}"
        if d["run_id"] != run_id:
            return f"holds run {d['run_id']!r}, not {run_id!r}"
        c = d["curve"]
        if not isinstance(c, list) or not c or not all(isinstance(x, dict) and "step" in x and "task_curve_pw" in x
                                                        and "control_curve_pw" in x for x in c):
            return "its curve is missing or malformed"
        if not isinstance(d["final"], dict):
            return "its final evaluation is missing"
        t2 = d.get("task2")
        if t2 is None:
            if d["arm"] in task2_arms and not d.get("diverged"):
                return "has no task-2 block, though its arm goes on to task 2 and it did not diverge on the task"
            return None
        if not isinstance(t2, dict):
            return f"its task-2 block is a JSON {type(t2).__name__}, not an object"
        c = t2.get("curve")
        if not isinstance(c, list) or not c or not all(isinstance(x, dict) and "step" in x and all(
                f"{k}_curve_pw" in x for k in ("task", "control", "task2")) for x in c):
            return "its task-2 curve is missing or malformed"
        f = t2.get("final")
        if not isinstance(f, dict) or any(k not in f for k in TASK2_FINAL):
            return "its task-2 final evaluation is missing or lacks " + ", ".join(
                k for k in TASK2_FINAL if not isinstance(f, dict) or k not in f)
        return None

    def load_runs(self, fingerprints: Mapping[str, str], report: Callable[[str], None] = lambda s: None,
                  task2_arms: Sequence[str] = ()) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
        """The usable finished runs, and the unusable files (:meth:`run_problem`).

        Args:
            fingerprints (mapping): ``settings``, ``model``, ``data`` every run must carry.
            report (callable, optional): receives one line per unusable file. Default: nothing.
            task2_arms (sequence of str, optional): the arms whose runs go on to task 2 (a run of one
                without its ``task2`` block is unusable). Default: ``()`` (no task 2).

        Returns:
            tuple: ``({run_id: run}, {run_id: why unusable})``.

        Raises:
            FolderError: a whole run file made under other settings, model or data (never mixed in).
        """
        runs: Dict[str, Dict[str, Any]] = {}
        bad: Dict[str, str] = {}
        if not self.runs_dir.is_dir():
            return runs, bad
        for p in sorted(self.runs_dir.glob("*.json")):
            rid = p.stem
            try:
                d: Any = json.loads(p.read_text(encoding="utf-8"))
                why = self.run_problem(rid, d, task2_arms)
            except (OSError, UnicodeDecodeError) as e:
                why = f"cannot be read ({type(e).__name__})"
            except json.JSONDecodeError as e:
                why = f"is not JSON (line {e.lineno}: {e.msg}; half-written?)"
            if why:
                bad[rid] = why
                report(f"run file {p} {why}: not used; the run is redone")
                continue
            for key in ("settings", "model", "data"):
                want = fingerprints.get(key)
                if want and d.get(f"{key}_fingerprint") != want:
                    raise FolderError(f"{p} was made with another {key} (fingerprint {d.get(f'{key}_fingerprint')} vs "
                                      f"{want} of this study); it does not belong in {self.path}: move it away")
            runs[rid] = d
        return runs, bad

    def set_aside(self, run_id: str) -> Optional[Path]:
        """Move an unusable run file aside (kept, never deleted): ``runs/<run_id>.json`` becomes
        ``runs/<run_id>.json.corrupt``, or ``.corrupt-N`` with the first free ``N``.

        Args:
            run_id (str): the run's id.

        Returns:
            Path or None: the new path, ``None`` when there is no run file.

        Raises:
            FolderError: 1000 set-aside copies of the run already exist.
        """
        src = self.run_path(run_id)
        if not src.exists():
            return None
        for i in range(1000):
            dst = src.with_name(src.name + (".corrupt" if i == 0 else f".corrupt-{i}"))
            if not dst.exists():
                os.rename(src, dst)
                return dst
        raise FolderError(f"{src}: too many set-aside copies; clean up {self.runs_dir}")

    def write_run(self, run: Mapping[str, Any]) -> Path:
        """Write a finished run atomically (replacing an unusable file of the same run).

        Args:
            run (mapping): the run's record, with at least the keys of :data:`RUN_REQUIRED`; written to
                ``runs/<run["run_id"]>.json``.

        Returns:
            Path: the run file.
        """
        p = self.run_path(run["run_id"])
        atomic_write_json(p, run)
        return p

    def claims_held(self) -> List[str]:
        """Run ids with a claim file (live or stale)."""
        if not self.claims_dir.is_dir():
            return []
        return sorted(p.stem for p in self.claims_dir.glob("*.claim"))
