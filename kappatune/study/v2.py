r"""The forgetting study v2's record: its results folder read as it stands, and its report written
again from its run files.

v2 (``benchmarks/results/forgetting_v2``, pre-registered in its ``PREREGISTRATION.md``) was run by
its own harness before ``kappatune study`` existed; the harness is in the repository's history. Its
folder holds v2's formats, which this module reads without changing them: ``config.json`` (the
design, :class:`V2Design`, its fingerprint checked), ``base.json``, ``selections.json`` and
``runs/<phase>_<arm>_s<seed>_lr<lr>.json`` (a ``main`` run of ``steps`` steps, a ``long`` one of
``long_steps``, a ``seq`` one: ``steps`` on the task then ``seq_steps`` on task 2). v2's design
differs from a ``kappatune study`` design in one rule: each arm's learning rate for seeds 1 and 2
(and the long and sequential phases) was chosen on seed 0 (:func:`choose_lr`), and its endpoints are
read at that learning rate, not on an envelope over the grid; so the record keeps its own analysis.

:func:`write_report` writes ``results.md``, ``summary.json`` and the plots (``frontier.png``,
``sequential.png``) from the run files with :mod:`kappatune.study.stats` (the paired bootstrap over
seeds and windows, each comparison from its own generator, the paired t, Holm over each
pre-registered family, the minimum detectable effects, and the replicates raised until no verdict can
flip by Monte-Carlo noise), as the committed report: every number of it is what this code computes.
It writes only from v2's whole record (:func:`verify_record`): ``record.json`` lists every file the
report is written from with its SHA-256, and a folder with a file missing, added or altered is refused
in one line before anything is written.

v2's design in the study vocabulary, to run it again with ``kappatune study`` (every grid point on
every seed, which contains v2's runs), is the study file next to the record, ``v2_study.json`` (main
and sequential phases) and ``v2_long_study.json`` (the long phase): ``python benchmarks/forgetting.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import stats as st
from .folder import FolderError, atomic_write_bytes, atomic_write_json, read_json
from .report import finite

__all__ = ["read_design", "load_runs", "analyse", "V2Design"]

ARMS = ("kappa_low", "random_kind", "kappa_high_kind", "kappa_low_kind", "random", "spectrum", "lora", "full")
"""v2's arms, in report order."""
RANDOM_ARMS = ("random_kind", "random")
"""The arms whose tensors are drawn per seed (the setup table lists every seed's draw)."""
LABELS = {"kappa_low": "κ-low", "random_kind": "random (κ-low's kinds)", "kappa_high_kind": "κ-high (κ-low's kinds)",
          "kappa_low_kind": "κ-low within kind", "random": "random", "spectrum": "Spectrum SNR",
          "lora": "LoRA", "full": "full FT"}
PHASES = ("main", "long", "seq")
"""v2's phases: the run files' prefixes (:class:`V2RunSpec`)."""
COMMAND = "python benchmarks/forgetting.py"
"""The command that made v2's runs (its own harness, in the repository's history)."""
REPORT_COMMAND = "python benchmarks/forgetting.py --v2-report"
"""The command that writes v2's report again (:func:`write_report`)."""

REF = "kappa_low"
ALPHA = 0.05                       # family-wise level of the pre-registered rule
MC_K = 3.0                         # a verdict is settled when |p_holm − α| > MC_K Monte-Carlo SEs
B_MAX = 256_000                    # the most bootstrap replicates the report tries
PREREGISTERED_B = 2000
EXPLORATORY_DELTAS = (0.45,)       # not pre-registered (added after L* turned out to be reached by step ~20)
# what a verdict says when the arm's value is above / below κ-low's
FORGETS = ("forgets more than κ-low", "forgets less than κ-low")
LOSES_TASK1 = ("loses more of task 1 than κ-low", "loses less of task 1 than κ-low")
# every family of comparisons: (title, verdict words, pre-registered?)
FAMILIES = {
    "primary": ("primary endpoint: Δcontrol at L*", FORGETS, True),
    "last": ("last step ({steps}), chosen LR: Δcontrol (unmatched adaptation)", FORGETS, True),
    "long_last": ("{long_steps} steps, last step: Δcontrol (unmatched adaptation)", FORGETS, True),
    "long_deep": ("{long_steps} steps: Δcontrol at base − {long_delta} nats", FORGETS, True),
    "seq_control": ("sequential: Δcontrol after task 2", FORGETS, True),
    "seq_task1": ("sequential: task-1 forgetting (after task 2 − after task 1)", LOSES_TASK1, True),
    "seq_task1_vs_base": ("sequential, descriptive (not pre-registered): task-1 loss after task 2 − base",
                          ("ends higher on task 1 than κ-low", "ends lower on task 1 than κ-low"), False),
    "seq_task1_gain": ("sequential, descriptive (not pre-registered): task-1 loss after task 1 − base",
                       ("went less far on task 1 than κ-low", "went further on task 1 than κ-low"), False),
}
USAGE = """## Run it on your own model

v2's harness is now `kappatune study` (the guide "Measure forgetting on your model"): the same kinds of arms at a
budget, learning-rate grids, seeds, task 2 in sequence, on your model and data, with every grid point on every seed
and each arm's lower envelope over its grid.

```bash
# v2's design again, with kappatune study (the study files v2_study.json and v2_long_study.json in this folder)
python benchmarks/forgetting.py                  # resumable; one worker per core: add --threads 1
python benchmarks/forgetting.py --long           # its long phase
kappatune study --model PATH/TO/causal-lm-folder --task my_domain.jsonl --control general_text.txt \\
    --task2 second_domain.txt --device cuda --out results/my_model_forgetting
kappatune study --out results/my_model_forgetting --report    # tables, plots, summary.json
python benchmarks/forgetting.py --v2-report      # this page again, from the run files of this folder
```

`--model` takes any folder `AutoModelForCausalLM.from_pretrained` reads (or a `.gguf` file); without it the
bundled SmolLM2-135M-Instruct GGUF is used. `--task/--control/--task2` take plain text (documents separated by
blank lines), JSONL (a `text` field per line; `--text-field` to change) or JSON; defaults: KJV verses, Wikipedia
summaries and (with `--task2-steps` alone) the interpreter's own standard library source, all offline."""


# ----------------------------------------------------------------------------------------------
# the record's formats
class V2Design:
    """v2's design as its ``config.json`` holds it: every setting that changes a run, fingerprinted into
    each run file, read as attributes with v2's names and meanings: ``steps`` (main phase, and task 1 of
    the sequential phase), ``long_steps``, ``seq_steps`` (task 2), ``eval_every``, ``curve_windows``,
    ``final_windows``, ``budget`` (fraction of the linear weights), ``seeds``, ``lrs`` (each arm's grid),
    ``lstar_delta`` (L* = base − this), ``long_lstar_delta``, ``arms``, ``long_arms``, ``seq_arms``,
    ``match_tol`` (the parameter-count match), and the descriptions ``model``, ``task``, ``control``,
    ``task2``.

    Args:
        settings (mapping): ``config.json``'s content (its ``fingerprint`` is set aside).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = {k: v for k, v in settings.items() if k != "fingerprint"}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_settings"][name]
        except KeyError:
            raise AttributeError(f"v2's design has no setting {name!r}") from None

    def fingerprint(self) -> str:
        """v2's settings fingerprint: 12 hex digits of SHA-1 over the settings (sorted JSON)."""
        return hashlib.sha1(json.dumps(self._settings, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> Dict[str, Any]:
        """The settings and the fingerprint (``config.json``'s content)."""
        return {**self._settings, "fingerprint": self.fingerprint()}


@dataclass(frozen=True)
class V2RunSpec:
    """One v2 run: an arm at one learning rate on one seed, in one phase (``main``, ``long``, ``seq``)."""

    arm: str
    lr: float
    seed: int
    phase: str = "main"

    @property
    def run_id(self) -> str:
        """``<phase>_<arm>_s<seed>_lr<lr>``: the run file's name."""
        return f"{self.phase}_{self.arm}_s{self.seed}_lr{self.lr:g}"


def read_design(folder: "str | Path") -> V2Design:
    """The design of a v2 folder (``config.json``), its recorded fingerprint checked.

    Args:
        folder (str or Path): v2's results folder (``benchmarks/results/forgetting_v2``).

    Returns:
        V2Design: the design ``config.json`` holds.

    Raises:
        FolderError: no ``config.json``, or one whose fingerprint is not its settings'.
    """
    p = Path(folder) / "config.json"
    d = read_json(p)
    if not isinstance(d, dict):
        raise FolderError(f"{p}: not a forgetting study v2 config")
    design = V2Design(d)
    if d.get("fingerprint") != design.fingerprint():
        raise FolderError(f"{p}: its fingerprint {d.get('fingerprint')} is not that of its settings "
                          f"({design.fingerprint()}): not v2's record as written")
    return design


RUN_REQUIRED = ("run_id", "arm", "phase", "seed", "lr", "steps", "wall_s", "cpu_s", "train_cpu_s",
                "config_fingerprint")
"""Keys every v2 run file holds; a ``main`` or ``long`` run also its ``curve`` and ``final``, a ``seq`` run
its ``task1``, ``task2`` (each with a ``curve``), ``after_task1``, ``after_task2``,
``dcontrol_after_task1`` and ``dtask2_after_task2``."""


def _curve_problem(c: Any, what: str) -> Optional[str]:
    if not isinstance(c, list) or not c or not all(isinstance(x, dict) and "step" in x for x in c):
        return f"its {what} is missing or malformed"
    return None


def run_problem(run_id: str, r: Any) -> Optional[str]:
    """Why the content of a v2 run file is not a v2 run as its harness wrote it: not a JSON object, a
    missing key (:data:`RUN_REQUIRED` and its phase's), another run's id, an unknown arm or phase, a
    malformed curve or final evaluation.

    Args:
        run_id (str): the run the file is named after (its name without ``.json``).
        r (Any): the file's JSON value.

    Returns:
        str or None: the reason, ``None`` when the run can be read.
    """
    if not isinstance(r, dict):
        return f"holds a JSON {type(r).__name__}, not a run object"
    phase_keys = {"main": ("curve", "final"), "long": ("curve", "final"),
                  "seq": ("task1", "task2", "after_task1", "after_task2", "dcontrol_after_task1",
                          "dtask2_after_task2")}.get(r.get("phase"), ())
    missing = [k for k in RUN_REQUIRED + phase_keys if k not in r]
    if missing:
        return f"lacks {', '.join(missing[:4])}"
    if r["run_id"] != run_id:
        return f"holds run {r['run_id']!r}, not {run_id!r}"
    if r["phase"] not in PHASES:
        return f"its phase {r['phase']!r} is not one of v2's ({', '.join(PHASES)})"
    if r["arm"] not in ARMS:
        return f"its arm {r['arm']!r} is not one of v2's"
    if r["phase"] == "seq":
        for k in ("after_task1", "after_task2"):
            if not isinstance(r[k], dict):
                return f"its {k} evaluation is missing or malformed"
        for k in ("task1", "task2"):
            why = _curve_problem(r[k].get("curve") if isinstance(r[k], dict) else None, f"{k} curve")
            if why:
                return why
        return None
    if not isinstance(r["final"], dict):
        return "its final evaluation is missing or malformed"
    return _curve_problem(r["curve"], "curve")


RECORD_FILE = "record.json"
"""The record's manifest in v2's folder: every file the report is written from (``config.json``,
``base.json``, ``selections.json``, each run file) with its SHA-256, written once from the committed
files (:func:`record_files`)."""
RECORD_SHA256 = "bc7110fd7d509ebe1b870bec1e0dce6388a0411d1864b4efa2e241f718fce26b"
"""SHA-256 of the committed :data:`RECORD_FILE`: the manifest itself cannot be edited unnoticed."""


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def record_files(folder: "str | Path") -> Dict[str, str]:
    """``{path relative to the folder: SHA-256}`` of the files v2's report is written from, as the
    folder holds them now: ``config.json``, ``base.json``, ``selections.json`` (those present) and
    every ``runs/*.json``.

    Args:
        folder (str or Path): a v2 results folder.

    Returns:
        dict: the files' digests, sorted by path.
    """
    out = Path(folder)
    names = [n for n in ("config.json", "base.json", "selections.json") if (out / n).is_file()]
    runs = sorted(p.relative_to(out).as_posix() for p in (out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
    return {n: _sha256(out / n) for n in sorted(names + runs)}


def verify_record(folder: "str | Path") -> None:
    """Refuse a v2 folder that is not v2's whole record: its :data:`RECORD_FILE` missing or not the
    committed one (:data:`RECORD_SHA256`), a file it lists missing (``base.json``, a run file, the
    whole ``runs/``), a run file it does not list, or a file whose SHA-256 differs from the recorded one.
    Nothing is written.

    Args:
        folder (str or Path): a v2 results folder (the repository's, or a copy).

    Raises:
        FolderError: one line naming the file at fault and the fix.
    """
    out = Path(folder)
    rp = out / RECORD_FILE
    if not rp.is_file():
        raise FolderError(f"{rp}: no such file; it lists the files of v2's record and their SHA-256: restore it "
                          "from the repository")
    if _sha256(rp) != RECORD_SHA256:
        raise FolderError(f"{rp}: not the manifest of v2's record as committed (SHA-256 {_sha256(rp)[:12]}… vs "
                          f"{RECORD_SHA256[:12]}…); restore it from the repository")
    want = read_json(rp).get("files") or {}
    have = record_files(out)
    for name, digest in want.items():
        if name not in have:
            raise FolderError(f"{out / name}: missing from v2's record ({len(want)} files in {RECORD_FILE}); restore "
                              "it from the repository")
        if have[name] != digest:
            raise FolderError(f"{out / name}: its content differs from v2's record (SHA-256 {have[name][:12]}… vs "
                              f"{digest[:12]}… in {RECORD_FILE}); restore it from the repository")
    extra = sorted(set(have) - set(want))
    if extra:
        raise FolderError(f"{out / extra[0]}: not a file of v2's record ({RECORD_FILE} lists "
                          f"{sum(n.startswith('runs/') for n in want)} run files); move it away")


def load_runs(folder: "str | Path", design: Optional[V2Design] = None) -> Dict[str, Dict[str, Any]]:
    """The run files of a v2 folder, ``{run_id: run}``; each must be a v2 run as written
    (:func:`run_problem`), and with ``design``, a run written under other settings is refused.

    Args:
        folder (str or Path): v2's results folder; its run files are ``runs/*.json``.
        design (V2Design, optional): the folder's design (:func:`read_design`); each run's
            ``config_fingerprint`` must be its fingerprint. Default: ``None`` (not checked).

    Returns:
        dict: ``{run_id: run}``, in file-name order; empty when the folder has no ``runs/``.

    Raises:
        FolderError: a run file that is not JSON, not a v2 run (one line naming the file and why), or
            of other settings.
    """
    runs: Dict[str, Dict[str, Any]] = {}
    d = Path(folder) / "runs"
    if not d.is_dir():
        return runs
    for p in sorted(d.glob("*.json")):
        r = read_json(p)
        why = run_problem(p.stem, r)
        if why:
            raise FolderError(f"{p} {why}: not a v2 run file as written; restore it from the repository")
        if design is not None and r.get("config_fingerprint") != design.fingerprint():
            raise FolderError(f"{p} was written under other study settings (fingerprint "
                              f"{r.get('config_fingerprint')} != {design.fingerprint()})")
        runs[r["run_id"]] = r
    return runs


def choose_lr(runs: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """v2's pre-registered LR rule on seed 0's runs of an arm (curve windows only): among the runs that
    reach L*, the one with the lower Δcontrol at L*; if none reaches it, the lower final curve task loss.
    A diverged run is never chosen while another exists; ties go to the lower LR."""
    if not runs:
        return None
    ok = [r for r in runs if not r.get("diverged")] or list(runs)
    reached = [r for r in ok if r.get("dcontrol_at_lstar") is not None]
    if reached:
        return min(reached, key=lambda r: (r["dcontrol_at_lstar"], r["lr"]))["lr"]

    def final_loss(r: Mapping[str, Any]) -> float:
        x = r["curve"][-1]["task_curve_loss"]
        return x if x is not None and math.isfinite(x) else math.inf

    return min(ok, key=lambda r: (final_loss(r), r["lr"]))["lr"]


def arm_order(arms: Sequence[str]) -> List[str]:
    """``arms`` in v2's report order (:data:`ARMS`)."""
    return [a for a in ARMS if a in arms]


def plan(cfg: V2Design, done: Mapping[str, Mapping[str, Any]]
         ) -> Tuple[List[V2RunSpec], List[str], Dict[str, Optional[float]]]:
    """v2's plan against the runs ``done``: ``(runs missing whose LR is known, groups waiting for seed
    0's LR grid, the LR chosen per arm)``. Seed 0 runs every arm's grid; seeds 1.., the long and the
    sequential phase run at the LR :func:`choose_lr` picks from it."""
    s0 = cfg.seeds[0]
    chosen: Dict[str, Optional[float]] = {}
    missing: List[V2RunSpec] = []
    waiting: List[str] = []
    for a in arm_order(cfg.arms):
        grid = [V2RunSpec(a, lr, s0, "main") for lr in cfg.lrs[a]]
        missing += [s for s in grid if s.run_id not in done]
        chosen[a] = choose_lr([done[s.run_id] for s in grid]) if all(s.run_id in done for s in grid) else None
    for phase, arms, seeds in (("main", cfg.arms, cfg.seeds[1:]), ("long", cfg.long_arms, cfg.seeds),
                               ("seq", cfg.seq_arms, cfg.seeds)):
        for a in arm_order(arms):
            lr = chosen.get(a)
            if lr is None:
                waiting.append(f"{phase} {a} seeds {list(seeds)} (wait for seed {s0}'s LR grid)")
                continue
            missing += [s for s in (V2RunSpec(a, lr, sd, phase) for sd in seeds) if s.run_id not in done]
    return missing, waiting, chosen


def _waiting_count(cfg: V2Design, waiting: Sequence[str]) -> int:
    return sum(len(cfg.seeds) - 1 if w.startswith("main") else len(cfg.seeds) for w in waiting)


# ----------------------------------------------------------------------------------------------
# endpoints and comparisons
def _pw(points: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.asarray([p[key] for p in points], dtype=np.float64)          # (K, n)


def curve_endpoint(run: Mapping[str, Any], Wt: np.ndarray, Wc: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Control-loss increase where a run's task curve first crosses ``level``, one value per bootstrap
    replicate.

    Args:
        run (mapping): a v2 run (its ``curve`` with per-window losses).
        Wt (numpy.ndarray): ``(B+1, n_task)`` task-window weights (:func:`kappatune.study.stats.window_weights`).
        Wc (numpy.ndarray): ``(B+1, n_control)`` control-window weights.
        level (numpy.ndarray): ``(B+1,)`` the level under each replicate's weights
            (:func:`kappatune.study.stats.resampled_level`: L* follows the resampled base loss).
    """
    pts = [c for c in run["curve"] if "task_curve_pw" in c]
    T = Wt @ _pw(pts, "task_curve_pw").T
    C = Wc @ _pw(pts, "control_curve_pw").T
    return st.crossing_batch(T, C, level) - C[:, 0]


def _compare(values: Mapping[str, Mapping[int, np.ndarray]], B: int, seed: int, label: str,
             family: Sequence[str], ref: str = REF) -> Dict[str, Any]:
    """Every arm against ``ref`` (paired over seeds and windows; bootstrap and paired t), Holm over the
    pre-registered ``family`` (every arm of the phase but ``ref``, whether or not it has a p-value yet):
    :func:`kappatune.study.stats.compare_to_reference`. Each comparison draws its seeds from its own
    generator, keyed by ``(seed, label, arm)``, so its interval does not move when runs of other arms or
    phases land."""
    return st.compare_to_reference(values, ref, B, seed, label, family, alpha=ALPHA)


def _seedvals(d: Mapping[int, np.ndarray], seeds) -> List[Optional[float]]:
    out = []
    for s in seeds:
        v = d.get(s)
        out.append(None if v is None or not np.isfinite(v[0]) else float(v[0]))
    return out


def _status(run: Optional[Mapping[str, Any]], value: Optional[float]) -> str:
    """A run's state for one endpoint: not run yet, diverged, level not reached, or ok."""
    if run is None:
        return "not run yet"
    if value is None:
        return "diverged" if run.get("diverged") else "not reached"
    return "ok"


def analyse(cfg: V2Design, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any], B: int = 2000,
            seed: int = 12345) -> Dict[str, Any]:
    """Every number of the report at ``B`` bootstrap replicates (the definitions are in v2's
    PREREGISTRATION.md).

    Args:
        cfg (V2Design): the design.
        runs (mapping): ``{run_id: run}`` (:func:`load_runs`).
        base (mapping): ``base.json``'s content.
        B (int, optional): bootstrap replicates. Default: ``2000``.
        seed (int, optional): seed of the window weights and of every comparison's generator.
            Default: ``12345``.

    Returns:
        dict: ``main``, ``exploratory``, ``long``, ``sequential`` (per arm), ``comparisons`` (every
            comparison with κ-low by ``"family/arm"``, the same objects as those nested in the phases),
            ``compute``, ``L_star``, ``L_long``, ``chosen_lr``, ``bootstrap``.
    """
    rng = np.random.default_rng(seed)
    chosen = plan(cfg, runs)[2]
    n_cc, n_tc = len(base["control_curve_pw"]), len(base["task_curve_pw"])
    n_cf, n_tf = len(base["control_final_pw"]), len(base["task_final_pw"])
    W = {"tc": st.window_weights(n_tc, B, rng), "cc": st.window_weights(n_cc, B, rng),
         "tf": st.window_weights(n_tf, B, rng), "cf": st.window_weights(n_cf, B, rng)}
    Ls, Ll = base["L_star"], base["task_curve_loss"] - cfg.long_lstar_delta
    cf0 = np.asarray(base["control_final_pw"])
    tf0 = np.asarray(base["task_final_pw"])
    out: Dict[str, Any] = {"L_star": Ls, "L_long": Ll, "chosen_lr": chosen, "bootstrap": B}
    every: Dict[str, Dict[str, Any]] = {}

    def compare(vals, label, family) -> Dict[str, Dict[str, Any]]:
        slim = {a: _slim(c) for a, c in _compare(vals, B, seed, label, family).items()}
        every.update({f"{label}/{a}": c for a, c in slim.items()})
        return slim

    def run_of(a, s, phase):
        return runs.get(V2RunSpec(a, chosen[a], s, phase).run_id) if chosen.get(a) else None

    def by_arm(phase, arms, fn, lr_of=lambda a: chosen.get(a), curve=False):
        """``{arm: {seed: (B+1,) values}}``. A diverged run keeps a curve endpoint it reached before
        diverging (``curve=True``: the pre-registration drops only runs that never reach L*); its
        last-step values are not used."""
        vals: Dict[str, Dict[int, np.ndarray]] = {}
        for a in arms:
            lr = lr_of(a)
            if lr is None:
                continue
            for s in cfg.seeds:
                r = runs.get(V2RunSpec(a, lr, s, phase).run_id)
                if r is None or (r.get("diverged") and not curve):
                    continue
                v = fn(r)
                if curve and r.get("diverged") and not np.isfinite(v[0]):
                    continue
                vals.setdefault(a, {})[s] = v
        return vals

    def statuses(phase, a, seedvals):
        return [_status(run_of(a, s, phase), v) for s, v in zip(cfg.seeds, seedvals)]

    # main phase
    arms = arm_order(cfg.arms)

    def level(x: float) -> np.ndarray:
        return st.resampled_level(W["tc"], base["task_curve_pw"], x)

    Ls_b, Ll_b = level(Ls), level(Ll)
    prim = by_arm("main", arms, lambda r: curve_endpoint(r, W["tc"], W["cc"], Ls_b), curve=True)
    last = by_arm("main", arms, lambda r: W["cf"] @ (np.asarray(r["final"]["control_final_pw"]) - cf0))
    cmp_p, cmp_l = compare(prim, "primary", arms), compare(last, "last", arms)
    main: Dict[str, Any] = {}
    for a in arms:
        rs = [run_of(a, s, "main") for s in cfg.seeds]
        main[a] = {"lr": chosen.get(a), "lr_grid": list(cfg.lrs[a]),
                   "seeds": _seedvals(prim.get(a, {}), cfg.seeds),
                   "reached": [None if r is None else r.get("dcontrol_at_lstar") is not None for r in rs],
                   "status": ["not run yet" if r is None else "diverged" if r.get("diverged") else
                              "ok" if r.get("dcontrol_at_lstar") is not None else "not reached" for r in rs],
                   "steps_to_lstar": [None if r is None else r.get("steps_to_lstar") for r in rs],
                   "dcontrol_last": [None if r is None else r.get("dcontrol_last") for r in rs],
                   "dtask_last": [None if r is None else r.get("dtask_last") for r in rs],
                   "dcontrol_acc_last": [None if r is None else r.get("dcontrol_acc_last") for r in rs],
                   "trainable_params": next((r["trainable_params"] for r in rs if r), None),
                   "kinds": next((r.get("selected_kinds") for r in rs if r), None),
                   "vs_kappa_low": cmp_p.get(a), "last_vs_kappa_low": cmp_l.get(a)}
        vals = [v for v in main[a]["seeds"] if v is not None]
        main[a]["mean"] = float(np.mean(vals)) if vals else None
        # every fixed LR, every seed that ran it: the last-step numbers
        main[a]["per_lr"] = {f"{lr:g}": [{"seed": s, **{k: r.get(k) for k in
                                                        ("dcontrol_at_lstar", "steps_to_lstar", "dtask_last",
                                                         "dcontrol_last", "dcontrol_acc_last")}}
                                         for s in cfg.seeds
                                         for r in [runs.get(V2RunSpec(a, lr, s, "main").run_id)] if r]
                             for lr in cfg.lrs[a]}
    out["main"] = main
    # exploratory, not pre-registered: the same endpoint at deeper task-loss levels
    expl: Dict[str, Any] = {}
    for delta in EXPLORATORY_DELTAS:
        lev = level(base["task_curve_loss"] - delta)
        vals = by_arm("main", arms, lambda r, lev=lev: curve_endpoint(r, W["tc"], W["cc"], lev), curve=True)
        cmp_e = compare(vals, f"exploratory_{delta:g}", arms)
        expl[f"{delta:g}"] = {}
        for a in arms:
            sv = _seedvals(vals.get(a, {}), cfg.seeds)
            expl[f"{delta:g}"][a] = {"seeds": sv, "status": statuses("main", a, sv), "vs_kappa_low": cmp_e.get(a)}
    out["exploratory"] = expl
    # long phase
    la = arm_order(cfg.long_arms)
    long_last = by_arm("long", la, lambda r: W["cf"] @ (np.asarray(r["final"]["control_final_pw"]) - cf0))
    long_deep = by_arm("long", la, lambda r: curve_endpoint(r, W["tc"], W["cc"], Ll_b), curve=True)
    long_star = by_arm("long", la, lambda r: curve_endpoint(r, W["tc"], W["cc"], Ls_b), curve=True)
    cl, cd = compare(long_last, "long_last", la), compare(long_deep, "long_deep", la)
    out["long"] = {}
    for a in la:
        deep = _seedvals(long_deep.get(a, {}), cfg.seeds)
        out["long"][a] = {"lr": chosen.get(a), "dcontrol_last": _seedvals(long_last.get(a, {}), cfg.seeds),
                          "dcontrol_at_L_long": deep, "status_L_long": statuses("long", a, deep),
                          "dcontrol_at_lstar": _seedvals(long_star.get(a, {}), cfg.seeds),
                          "dtask_last": [None if r is None else r.get("dtask_last")
                                         for r in (run_of(a, s, "long") for s in cfg.seeds)],
                          "last_vs_kappa_low": cl.get(a), "L_long_vs_kappa_low": cd.get(a)}
    # sequential phase
    sa = arm_order(cfg.seq_arms)
    sq_c = by_arm("seq", sa, lambda r: W["cf"] @ (np.asarray(r["after_task2"]["control_final_pw"]) - cf0))
    sq_t = by_arm("seq", sa, lambda r: W["tf"] @ (np.asarray(r["after_task2"]["task_final_pw"])
                                                 - np.asarray(r["after_task1"]["task_final_pw"])))
    sq_t1 = by_arm("seq", sa, lambda r: W["tf"] @ (np.asarray(r["after_task2"]["task_final_pw"]) - tf0))
    sq_g = by_arm("seq", sa, lambda r: W["tf"] @ (np.asarray(r["after_task1"]["task_final_pw"]) - tf0))
    c1, c2, c3 = (compare(sq_c, "seq_control", sa), compare(sq_t, "seq_task1", sa),
                  compare(sq_t1, "seq_task1_vs_base", sa))
    c4 = compare(sq_g, "seq_task1_gain", sa)
    seq: Dict[str, Any] = {}
    for a in sa:
        rs = [run_of(a, s, "seq") for s in cfg.seeds]
        seq[a] = {"lr": chosen.get(a), "seeds": _seedvals(sq_c.get(a, {}), cfg.seeds),
                  "task1_forgetting": _seedvals(sq_t.get(a, {}), cfg.seeds),
                  "task1_vs_base_after_task2": _seedvals(sq_t1.get(a, {}), cfg.seeds),
                  "dtask1_after_task1": _seedvals(sq_g.get(a, {}), cfg.seeds),
                  "dcontrol_after_task1": [None if r is None else r["dcontrol_after_task1"] for r in rs],
                  "dtask2_after_task2": [None if r is None else r["dtask2_after_task2"] for r in rs],
                  "rescan": [None if r is None else {k: v for k, v in r["task2"].get("rescan", {}).items()
                                                     if k != "kappa_changed"} or None for r in rs],
                  "task2_overlap_with_task1": [None if r is None else r["task2"].get("overlap_with_task1") for r in rs],
                  "vs_kappa_low": c1.get(a), "task1_forgetting_vs_kappa_low": c2.get(a),
                  "task1_vs_base_vs_kappa_low": c3.get(a), "task1_gain_vs_kappa_low": c4.get(a)}
    out["sequential"] = seq
    out["comparisons"] = every
    # compute
    by_phase: Dict[str, Dict[str, float]] = {}
    for r in runs.values():
        d = by_phase.setdefault(r["phase"], {"runs": 0, "wall_s": 0.0, "cpu_s": 0.0, "steps": 0, "train_cpu_s": 0.0})
        d["runs"] += 1
        d["wall_s"] += r["wall_s"]
        d["cpu_s"] += r["cpu_s"]
        d["steps"] += r["steps"]
        d["train_cpu_s"] += r["train_cpu_s"]
    out["compute"] = {"by_phase": by_phase, "cpu_s": sum(d["cpu_s"] for d in by_phase.values()),
                      "wall_s": sum(d["wall_s"] for d in by_phase.values()),
                      "cpu_s_per_step": {a: _per_step(runs, a) for a in arms}}
    return out


def analyse_stable(cfg: V2Design, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any],
                   B: int = PREREGISTERED_B,
                   B_max: int = B_MAX, seed: int = 12345) -> Dict[str, Any]:
    """:func:`analyse` at enough replicates that no verdict can flip by Monte-Carlo noise: ``B`` doubled
    until no comparison's Holm p is within ``MC_K`` Monte-Carlo SEs of ``ALPHA``
    (:func:`kappatune.study.stats.stable_replicates`), at most ``B_max``. ``out["monte_carlo"]`` says how
    it went; each comparison gets ``mc_at_risk`` and ``mc_margin`` (``|p_holm − α|`` in Monte-Carlo SEs)."""
    A, info = st.stable_replicates(lambda b: analyse(cfg, runs, base, B=b, seed=seed), lambda a: a["comparisons"],
                                   B=B, B_max=max(B, B_max), alpha=ALPHA, k=MC_K)
    for c in A["comparisons"].values():
        c["mc_at_risk"] = st.verdict_at_risk(c, ALPHA, MC_K)
        se = c.get("p_holm_mc_se")
        c["mc_margin"] = None if c.get("p_holm") is None or not se else abs(c["p_holm"] - ALPHA) / se
    A["monte_carlo"] = info
    return A


def _per_step(runs, arm) -> Optional[float]:
    rs = [r for r in runs.values() if r["arm"] == arm and r["phase"] == "main"]
    return statistics.mean(r["train_cpu_s"] / max(1, r["steps"]) for r in rs) if rs else None


SLIM_KEYS = ("mean_diff", "ci95", "ci95_mc_se", "p", "p_at_floor", "p_mc_se", "p_holm", "p_holm_mc_se", "holm_m",
             "se", "mde", "mde_holm", "t_ci95", "t_stat", "t_df", "t_se", "t_p", "t_p_holm", "t_mde", "t_mde_holm",
             "decision", "t_decision", "diffs", "valid", "kept")


def _slim(r: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if r is None:
        return None
    d = {k: r.get(k) for k in SLIM_KEYS}
    d["paired_seeds"] = r.get("seeds")
    return d


def _p(c: Mapping[str, Any], key: str = "p_holm") -> str:
    """A Holm p as printed: 3 significant digits, ``≤`` at the bootstrap's floor."""
    p = c.get(key)
    if p is None:
        return "—"
    if key == "p_holm" and c.get("p_at_floor"):
        return f"≤ {p:.2g}"
    return f"{p:.3g}"


def _p_mc(c: Mapping[str, Any], long: bool = True) -> str:
    """The bootstrap Holm p with its Monte-Carlo SE (at the floor: the bound, and why)."""
    if c.get("p_holm") is None:
        return "—"
    if c.get("p_at_floor"):
        return f"≤ {c['p_holm']:.2g} " + ("(no replicate on the other side of 0)" if long else "(floor)")
    return f"{c['p_holm']:.3g} ± {c['p_holm_mc_se']:.2g}"


def _direction(d: int, words: Tuple[str, str]) -> str:
    return words[0] if d > 0 else words[1]


def _head(c: Optional[Mapping[str, Any]], words: Tuple[str, str] = FORGETS,
          missing: str = "no paired seeds yet") -> Tuple[str, str]:
    """The pre-registered verdict and, where the bootstrap CI excludes zero but Holm does not pass, why
    it is still 'no difference detected'."""
    if c is None or c.get("mean_diff") is None:
        return missing, ""
    if c.get("ci95") is None:
        n = len(c["paired_seeds"])
        return ("too few seeds for a CI" if n < 2 else "too few bootstrap replicates kept (curves miss the level)"), ""
    if c["decision"]:
        return f"**{_direction(c['decision'], words)}**", ""
    lo, hi = c["ci95"]
    if lo > 0 or hi < 0:
        return "no difference detected", "the bootstrap CI excludes 0 but Holm's p ≥ 0.05: the verdict rests on Holm"
    return "no difference detected", ""


def verdict_head(c: Optional[Mapping[str, Any]], words: Tuple[str, str] = FORGETS,
                 missing: str = "no paired seeds yet") -> str:
    """The pre-registered verdict alone: 'more'/'less' only where the bootstrap CI excludes zero and the
    bootstrap Holm p < α; a CI that excludes zero with Holm p ≥ α says that the verdict rests on Holm."""
    head, why = _head(c, words, missing)
    return f"{head} ({why})" if why else head


def t_note(c: Optional[Mapping[str, Any]], words: Tuple[str, str] = FORGETS) -> str:
    """Where the paired t (its interval and Holm p over the same family) disagrees with the verdict."""
    if c is None or c.get("ci95") is None or c.get("t_decision") is None or c["t_decision"] == c["decision"]:
        return ""
    if c["decision"]:
        return f"the paired t does not support it (paired-t Holm p {_p(c, 't_p_holm')})"
    return f"the paired t alone would say it {_direction(c['t_decision'], words)} (Holm p {_p(c, 't_p_holm')})"


def verdict(c: Optional[Mapping[str, Any]], words: Tuple[str, str] = FORGETS, unit: str = "nats",
            missing: str = "no paired seeds yet") -> str:
    """One comparison in words: the pre-registered verdict, then the bootstrap CI and Holm p with its
    Monte-Carlo SE, the paired-t CI and Holm p, and where the two tests disagree or Monte-Carlo noise
    could still flip the verdict."""
    head, why = _head(c, words, missing)
    if c is None or c.get("mean_diff") is None:
        return head
    if c.get("ci95") is None:
        return f"{head} (mean diff {c['mean_diff']:+.4f} {unit} on {len(c['paired_seeds'])} paired seed(s))"
    lo, hi = c["ci95"]
    tlo, thi = c["t_ci95"]
    s = (f"diff {c['mean_diff']:+.4f} {unit}; bootstrap 95% CI [{lo:+.4f}, {hi:+.4f}], p_holm {_p_mc(c)}; "
         f"paired t 95% CI [{tlo:+.4f}, {thi:+.4f}], p_holm {_p(c, 't_p_holm')}; m={c['holm_m']}, "
         f"{len(c['paired_seeds'])} seeds")
    notes = [n for n in (why, t_note(c, words)) if n]
    if c.get("mc_at_risk"):
        notes.append("within 3 Monte-Carlo SEs of α: this verdict could still flip by Monte-Carlo noise")
    return f"{head} ({s}" + "".join(f"; {n}" for n in notes) + ")"


def _short(c: Optional[Mapping[str, Any]], words: Tuple[str, str] = FORGETS, missing: str = "no paired seeds yet") -> str:
    """The verdict for a table cell: the pre-registered one, and the paired t's where it differs."""
    note = t_note(c, words)
    return (verdict_head(c, words, missing) + (f"; {note}" if note else "")
            + ("; ⚠ Monte-Carlo" if c and c.get("mc_at_risk") else ""))


def _v(x, nd=4):
    return "—" if x is None else f"{x:+.{nd}f}"


def _seeds_str(xs, status=None) -> str:
    """Per-seed values; ``—`` = not run yet, ``n/r`` = level not reached, ``div`` = diverged."""
    tag = {"not run yet": "—", "not reached": "n/r", "diverged": "div"}
    if status is None:
        return ", ".join("—" if x is None else f"{x:+.3f}" for x in xs)
    return ", ".join(f"{x:+.3f}" if x is not None else tag.get(s, "—") for x, s in zip(xs, status))


def _missing(status: Sequence[str]) -> str:
    """Why an arm has no comparison: none of its runs exists yet, or none reached the level."""
    if status and all(s == "not run yet" for s in status):
        return "not run yet"
    return "level not reached by any seed: nothing to compare"


def _family_title(label: str, cfg: V2Design) -> str:
    if label.startswith("exploratory_"):
        return f"exploratory (not pre-registered): Δcontrol at base − {label.split('_', 1)[1]} nats"
    return FAMILIES[label][0].format(steps=cfg.steps, long_steps=cfg.long_steps, long_delta=cfg.long_lstar_delta)


def _words(label: str) -> Tuple[str, str]:
    return FAMILIES.get(label, ("", FORGETS, False))[1]


def comparison_table(A: Mapping[str, Any], label: str, cfg: V2Design) -> List[str]:
    """Every comparison of one family: both intervals, both Holm p-values, the Monte-Carlo SE of the
    bootstrap one, both MDEs (at α and at Holm's first level α/m) and the verdicts."""
    rows = [(k.split("/", 1)[1], c) for k, c in A["comparisons"].items() if k.split("/", 1)[0] == label]
    if not rows:
        return []
    words = _words(label)
    lines = [f"Comparisons with κ-low, {_family_title(label, cfg)} (arm − κ-low, nats):", "",
             "| arm | seeds | diff | bootstrap 95% CI | bootstrap p_holm ± MC-SE | paired-t 95% CI | paired-t p_holm | "
             "MDE bootstrap (α / Holm) | MDE paired t (α / Holm) | verdict (pre-registered: bootstrap) | paired t |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, c in rows:
        if c.get("ci95") is None:
            lines.append(f"| {LABELS[a]} | {len(c['paired_seeds'])} | {_v(c['mean_diff'])} | — | — | — | — | — | — | "
                         f"{verdict_head(c, words, 'no seed where both runs reached the level')} | — |")
            continue
        lo, hi = c["ci95"]
        tlo, thi = c["t_ci95"]
        tv = "agrees" if c["t_decision"] == c["decision"] else (
            "no difference" if not c["t_decision"] else _direction(c["t_decision"], words))
        if not c["t_decision"] and (tlo > 0 or thi < 0):  # the t interval excludes 0, its Holm p does not pass
            tv += " (the paired-t CI excludes 0 but its Holm p ≥ 0.05: rests on Holm)"
        mc = " ⚠ within 3 MC-SE of α" if c.get("mc_at_risk") else ""
        lines.append(f"| {LABELS[a]} | {len(c['paired_seeds'])} | {c['mean_diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                     f"{_p_mc(c, long=False)}{mc} | [{tlo:+.4f}, {thi:+.4f}] | {_p(c, 't_p_holm')} | "
                     f"{c['mde']:.4f} / {c['mde_holm']:.4f} | {c['t_mde']:.4f} / {c['t_mde_holm']:.4f} | "
                     f"{verdict_head(c, words)} | {tv} |")
    return lines + [""]


def _rule_text(A: Mapping[str, Any]) -> List[str]:
    mc = A["monte_carlo"]
    return [
        "**Which interval a verdict rests on.** Every verdict applies the pre-registered rule to the **bootstrap**: "
        "an arm forgets more or less than κ-low only where the bootstrap 95% CI excludes zero **and** its "
        "Holm-adjusted bootstrap p < 0.05; otherwise \"no difference detected\" (when the CI excludes zero but "
        "Holm's p does not pass, the verdict rests on Holm and says so). The paired-t interval over seeds and its "
        "Holm-adjusted p (same family, same m) are printed beside it, and the \"paired t\" column says where "
        "the paired t disagrees. With 3 seeds the seed bootstrap has only 10 distinct seed draws: when the three "
        "per-seed differences share a sign, every replicate does too (up to window noise) and the bootstrap p "
        "sits at its floor 1/B (shown as \"≤ m/B\" after Holm, \"floor\"), however large the spread between seeds "
        "and however many replicates are drawn; the paired t has 2 degrees of freedom and is far more "
        "conservative. A verdict the paired t does not support rests on the bootstrap alone.",
        "",
        f"**Monte-Carlo error.** B = {mc['B']:,} bootstrap replicates (pre-registered: {PREREGISTERED_B:,}; raised, "
        f"doubling from {mc['B_start']:,}, until no comparison's Holm p lies within {mc['k']:g} Monte-Carlo SEs "
        f"of {mc['alpha']:g}, at most {mc['B_max']:,}; "
        + ("every verdict is settled" if mc["stable"] else
           f"**not settled at the maximum** for: {', '.join(mc['at_risk'])}")
        + "). MC-SE of a two-sided bootstrap p = √(p(2 − p)/B′) (B′ replicates kept), carried through Holm's "
        "step; it measures only the resampling noise of this report, not the uncertainty of the study.",
        "", "MDE = the difference detectable with 80% power: (z₀.₉₇₅ + z₀.₈) × bootstrap SE at α = 0.05, and with "
        "z at Holm's first level α/m; for the paired t (t₁₋α/₂,₂ + t₀.₈,₂) × s_d/√3 likewise (t at α/m for Holm).", ""]


def _status_line(n_done: int, n_total: int, unfinished: bool) -> str:
    if not unfinished:
        return f"**Status: all {n_done} planned runs finished.**"
    return (f"**Status: {n_done} of ~{n_total} planned runs finished.** Numbers below use only finished runs; "
            "where a CI is missing no conclusion is drawn.")


def write_report(folder: "str | Path", command: str = COMMAND, B: int = PREREGISTERED_B, plots: bool = True,
                 B_max: int = B_MAX) -> str:
    """Write the v2 folder's ``results.md`` and ``summary.json`` (and its plots) from its run files;
    returns the text of ``results.md``.

    Args:
        folder (str or Path): the v2 results folder (``benchmarks/results/forgetting_v2``).
        command (str, optional): the command that made the runs, quoted. Default: :data:`COMMAND`.
        B (int, optional): bootstrap replicates to start from (raised until no verdict can flip by
            Monte-Carlo noise). Default: ``2000`` (as pre-registered).
        plots (bool, optional): draw ``frontier.png`` and ``sequential.png`` (matplotlib); without,
            the report shows the figures already in the folder. Default: ``True``.
        B_max (int, optional): the most bootstrap replicates. Default: ``256000``.

    Raises:
        FolderError: a missing or altered ``config.json``, a run file that is not a v2 run or is of other
            settings, or a folder that is not v2's whole record (:func:`verify_record`: a file missing,
            added or altered); nothing is written then.
    """
    out = Path(folder)
    cfg = read_design(out)
    runs = load_runs(out, cfg)
    verify_record(out)
    base = read_json(out / "base.json")
    ready, waiting, chosen = plan(cfg, runs)
    lines = ["# Forgetting study v2: does κ-selection forget less once module kind, LR and noise are controlled?", ""]
    lines += [USAGE, ""]
    if command:
        lines += [f"This folder was made with: `{command}` (v2's own harness, in the repository's history; this "
                  f"report is written from its run files by `kappatune.study.v2`: `{REPORT_COMMAND}`).", ""]
    lines += [f"Pre-registration: [PREREGISTRATION.md](PREREGISTRATION.md) (committed before the first run; its "
              f"dated amendments and corrections at the end). Settings fingerprint `{cfg.fingerprint()}`; v1 (the "
              f"first study) stays in `../forgetting/`.", ""]
    n_done = len(runs)
    n_total = n_done + len(ready) + _waiting_count(cfg, waiting)
    lines += [_status_line(n_done, n_total, bool(ready or waiting)), ""]
    A = analyse_stable(cfg, runs, base, B=B, B_max=B_max)
    sel_p = out / "selections.json"
    sel = read_json(sel_p) if sel_p.exists() else None
    lines += ["## Setup", "",
              f"Model: {cfg.model}; precision {cfg.precision}. Task: {cfg.task}; control: {cfg.control}; task 2 "
              f"(sequential phase): {cfg.task2}. Windows of {cfg.seq_len} tokens, batch {cfg.batch}, AdamW (weight decay "
              f"{cfg.weight_decay:g}, constant LR, grad-norm clip {cfg.grad_clip:g}); {cfg.steps} steps (long phase "
              f"{cfg.long_steps}, sequential {cfg.steps} + {cfg.seq_steps}); seeds {list(cfg.seeds)} (training order, "
              f"random draws, LoRA init). Curve every {cfg.eval_every} steps on {cfg.curve_windows} + "
              f"{cfg.curve_windows} held-out windows; final evaluation on {cfg.final_windows} + {cfg.final_windows} other "
              "held-out windows; per-window losses kept.", ""]
    lines += [f"Before training: task loss {base['task_curve_loss']:.4f} (curve) / {base['task_final_loss']:.4f} "
              f"(final), control {base['control_curve_loss']:.4f} / {base['control_final_loss']:.4f}, control "
              f"next-token accuracy {base['control_final_acc']:.4f}. **L\\* = {base['L_star']:.4f}** "
              f"(base − {cfg.lstar_delta}).", ""]
    if sel is not None:
        ref = sel["reference_params"]
        lines += [f"Budget {cfg.budget} of the {sel['linear_params']:,} linear-weight parameters: κ-low trains "
                  f"{ref:,} ({ref / sel['linear_params']:.2%}); LoRA r={sel['lora']['r']} on {sel['lora']['targets']}: "
                  f"{sel['lora']['params']:,} ({sel['lora']['params'] / ref - 1:+.1%}).", "",
                  "| arm | seed | tensors | params (vs κ-low) | kinds | κ range | rule |", "|---|---|---|---|---|---|---|"]
        for sd, arms in sel["arms"].items():
            for a, d in arms.items():
                if a in cfg.arms and (sd == str(cfg.seeds[0]) or a in RANDOM_ARMS):
                    kr = d["kappa_range"]
                    lines.append(f"| {LABELS[a]} | {sd} | {len(d['names'])} | {d['params']:,} "
                                 f"({d['params'] / ref - 1:+.1%}) | "
                                 + ", ".join(f"{k} {v}" for k, v in d["kinds"].items())
                                 + f" | {kr[0]:.3g} … {kr[1]:.3g} | {d['rule']} |")
        lines.append("")
    lines += ["## How the comparisons are read", ""] + _rule_text(A)
    lines += ["## Primary endpoint: control-loss increase at L\\* (nats; lower = less forgetting)", "",
              "Interpolated on each run's curve (curve windows), at the LR chosen on seed 0 by the pre-registered rule. "
              "Differences are arm − κ-low, paired per seed; bootstrap over seeds and windows; Holm over the arms. "
              "Per seed: n/r = L\\* not reached within the run, — = not run yet.", "",
              "| arm | LR (grid) | trainable | per seed | mean | vs κ-low | steps to L\\* |", "|---|---|---|---|---|---|---|"]
    for a, m in A["main"].items():
        lr = "—" if m["lr"] is None else f"{m['lr']:g}"
        vs = "(reference)" if a == REF else _short(m["vs_kappa_low"], missing=_missing(m["status"]))
        stp = ", ".join("—" if x is None else f"{x:.0f}" for x in m["steps_to_lstar"])
        tp = "—" if m["trainable_params"] is None else f"{m['trainable_params']:,}"
        lines.append(f"| {LABELS[a]} | {lr} ({', '.join(f'{x:g}' for x in m['lr_grid'])}) | {tp} | "
                     f"{_seeds_str(m['seeds'], m['status'])} | {_v(m['mean'])} | {vs} | {stp} |")
    lines += [""] + comparison_table(A, "primary", cfg)
    lines += ["## Headline (computed from the CIs)", ""] + headline(A, cfg)
    lines += ["", "## Secondary: last step, every fixed LR (final windows)", "",
              "| arm | LR | seed | Δtask | Δcontrol | Δcontrol accuracy | Δcontrol at L\\* (curve) |",
              "|---|---|---|---|---|---|---|"]
    for a, m in A["main"].items():
        for lr, rows in m["per_lr"].items():
            for r in rows:
                lines.append(f"| {LABELS[a]} | {lr} | {r['seed']} | {_v(r['dtask_last'])} | {_v(r['dcontrol_last'])} | "
                             f"{_v(r['dcontrol_acc_last'])} | {_v(r['dcontrol_at_lstar'])} |")
    lines += ["", "Last-step Δcontrol at the chosen LR vs κ-low (unmatched adaptation: read with Δtask).", ""]
    lines += comparison_table(A, "last", cfg)
    for d, rows in A.get("exploratory", {}).items():
        lines += [f"## Exploratory, not pre-registered: Δcontrol at base − {d} nats (curve windows)", "",
                  "Added after the first runs showed L\\* reached within ~20 steps (the primary endpoint then rests on "
                  "the first 20–40 steps). Same interpolation and statistics; read as exploratory. Per seed: n/r = "
                  "the level was not reached within the run.", "",
                  "| arm | per seed | vs κ-low |", "|---|---|---|"]
        for a, m in rows.items():
            lines.append(f"| {LABELS[a]} | {_seeds_str(m['seeds'], m['status'])} | "
                         f"{'(reference)' if a == REF else _short(m['vs_kappa_low'], missing=_missing(m['status']))} |")
        lines += [""] + comparison_table(A, f"exploratory_{d}", cfg)
    lines += [f"## Longer training ({cfg.long_steps} steps)", "",
              f"| arm | LR | Δtask last | Δcontrol last | Δcontrol at L\\* | Δcontrol at base − {cfg.long_lstar_delta} | "
              "last vs κ-low | deep level vs κ-low |", "|---|---|---|---|---|---|---|---|"]
    for a, m in A["long"].items():
        lr = "—" if m["lr"] is None else f"{m['lr']:g}"
        lines.append(f"| {LABELS[a]} | {lr} | {_seeds_str(m['dtask_last'])} | {_seeds_str(m['dcontrol_last'])} | "
                     f"{_seeds_str(m['dcontrol_at_lstar'])} | {_seeds_str(m['dcontrol_at_L_long'], m['status_L_long'])} | "
                     f"{'—' if a == REF else _short(m['last_vs_kappa_low'])} | "
                     f"{'—' if a == REF else _short(m['L_long_vs_kappa_low'], missing=_missing(m['status_L_long']))} |")
    lines += [""] + comparison_table(A, "long_last", cfg) + comparison_table(A, "long_deep", cfg)
    lines += [f"## Continual learning: {cfg.task} ({cfg.steps} steps) then {cfg.task2} ({cfg.seq_steps} steps)", "",
              "Control forgetting = control loss after task 2 − base; task-1 forgetting = task-1 loss after task 2 − "
              "after task 1; Δtask 1 after task 1 = task-1 loss after task 1 − base (how far task 1 went before task 2); "
              "all on the final windows.", "",
              "| arm | LR | Δtask 1 after task 1 | Δcontrol after task 1 | Δcontrol after task 2 | task-1 forgetting | "
              "Δtask 2 | κ re-scan (changed / recomputed) | control vs κ-low | task-1 forgetting vs κ-low |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for a, m in A["sequential"].items():
        lr = "—" if m["lr"] is None else f"{m['lr']:g}"
        rs = "; ".join("—" if x is None else f"{x['changed_tensors']} / {x['recomputed']}" for x in m["rescan"])
        lines.append(f"| {LABELS[a]} | {lr} | {_seeds_str(m['dtask1_after_task1'])} | "
                     f"{_seeds_str(m['dcontrol_after_task1'])} | {_seeds_str(m['seeds'])} | "
                     f"{_seeds_str(m['task1_forgetting'])} | {_seeds_str(m['dtask2_after_task2'])} | {rs} | "
                     f"{'—' if a == REF else _short(m['vs_kappa_low'])} | "
                     f"{'—' if a == REF else _short(m['task1_forgetting_vs_kappa_low'], LOSES_TASK1)} |")
    lines += [""]
    for label in ("seq_control", "seq_task1", "seq_task1_vs_base", "seq_task1_gain"):
        lines += comparison_table(A, label, cfg)
    lines += ["The last two families are descriptive (not pre-registered): where each arm stands on task 1 after task 2 "
              "and after task 1, so that task-1 forgetting can be read against how far task 1 had gone.", ""]
    lines += monte_carlo_section(A)
    C = A["compute"]
    lines += ["## Compute", "",
              f"{n_done} runs: {C['cpu_s'] / 3600:.2f} h of process CPU time, {C['wall_s'] / 3600:.2f} h wall "
              "(wall includes any pause of the runner by other benchmarks; CPU time does not).", "",
              "| phase | runs | steps | CPU h | wall h |", "|---|---|---|---|---|"]
    for ph, d in sorted(C["by_phase"].items()):
        lines.append(f"| {ph} | {d['runs']} | {d['steps']} | {d['cpu_s'] / 3600:.2f} | {d['wall_s'] / 3600:.2f} |")
    lines += ["", "Training CPU s/step (main phase): " + ", ".join(
        f"{LABELS[a]} {v:.2f}" for a, v in C["cpu_s_per_step"].items() if v is not None), ""]
    if ready or waiting:
        lines += [f"## NOT FINISHED: {len(ready)} run(s) ready, {len(waiting)} group(s) waiting", ""]
        lines += [f"- ready: {s.run_id}" for s in ready[:60]] + ([f"- … {len(ready) - 60} more"] if len(ready) > 60 else [])
        lines += [f"- waiting: {w}" for w in waiting]
        lines += ["", "v2's harness is gone: these runs can no longer be made (rerun v2's design with "
                      "`python benchmarks/forgetting.py`)."]
    else:
        lines += [f"All {n_done} planned runs finished."]
    made = write_plots(cfg, out, runs, base, A) if plots else [
        p for p in (out / "frontier.png", out / "sequential.png") if p.is_file()]
    if made:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in made]
    text = "\n".join(lines) + "\n"
    s = summary(cfg, A, base, runs, ready, waiting)
    atomic_write_json(out / "summary.json", s, strict=True)       # strict JSON, or fail before writing
    atomic_write_bytes(out / "results.md", text.encode("utf-8"))
    return text


def monte_carlo_section(A: Mapping[str, Any]) -> List[str]:
    """How many replicates it took, and each comparison's Monte-Carlo error and margin."""
    mc = A["monte_carlo"]
    hist = "; ".join(f"B = {h['B']:,}: " + (", ".join(h["at_risk"]) if h["at_risk"] else "none at risk")
                     for h in mc["history"])
    lines = ["## Monte-Carlo error of the bootstrap", "",
             f"Replicates raised from {mc['B_start']:,} (doubling, at most {mc['B_max']:,}) while any verdict was within "
             f"{mc['k']:g} Monte-Carlo SEs of flipping (Holm p within {mc['k']:g} MC-SE of {mc['alpha']:g}, or, "
             f"below it, the CI bound nearest zero within {mc['k']:g} of its MC-SEs of zero). Comparisons at risk at "
             f"each count: {hist}. Final B = {mc['B']:,}: "
             + ("no verdict can flip by Monte-Carlo noise." if mc["stable"] else
                f"**still at risk at the maximum: {', '.join(mc['at_risk'])}**."), "",
             "| comparison | bootstrap p (MC-SE) | p_holm (MC-SE) | margin to α in MC-SEs | CI bounds' MC-SE | "
             "replicates kept |", "|---|---|---|---|---|---|"]
    for k, c in A["comparisons"].items():
        if c.get("p") is None:
            continue
        margin = "—" if c.get("mc_margin") is None else f"{c['mc_margin']:.1f}"
        p = f"{c['p']:.3g} ({c['p_mc_se']:.2g})" + (" floor" if c.get("p_at_floor") else "")
        lines.append(f"| {k} | {p} | {c['p_holm']:.3g} ({c['p_holm_mc_se']:.2g}) | {margin} | "
                     f"{c['ci95_mc_se'][0]:.4f}, {c['ci95_mc_se'][1]:.4f} | {c['kept']:,} |")
    return lines + [""]


def headline(A: Mapping[str, Any], cfg: V2Design) -> List[str]:
    """The headline of the report, one markdown bullet per finding, computed from the intervals."""
    out = []
    m = A["main"]
    if REF not in m or m[REF]["mean"] is None:
        return ["- κ-low has no finished run at its chosen LR yet: no headline."]
    out.append(f"- κ-low: Δcontrol at L\\* {_seeds_str(m[REF]['seeds'], m[REF]['status'])} "
               f"(mean {m[REF]['mean']:+.4f} nats).")
    for a in ("random_kind", "kappa_high_kind"):
        if a in m:
            out.append(f"- κ vs kind — {LABELS[a]}: {verdict(m[a]['vs_kappa_low'], missing=_missing(m[a]['status']))}.")
    for a in ("kappa_low_kind", "random", "spectrum", "lora", "full"):
        if a in m:
            out.append(f"- {LABELS[a]}: {verdict(m[a]['vs_kappa_low'], missing=_missing(m[a]['status']))}.")
    for a, s in A["long"].items():
        if a != REF:
            dt = [x for x in s["dtask_last"] if x is not None]
            dr = [x for x in A["long"].get(REF, {}).get("dtask_last", []) if x is not None]
            dtask = (f" (Δtask at the last step, mean over seeds: {np.mean(dt):+.3f}"
                     + (f", κ-low {np.mean(dr):+.3f}" if dr else "") + ")") if dt else ""
            out.append(f"- long ({cfg.long_steps} steps), {LABELS[a]}: last step {verdict(s['last_vs_kappa_low'])}"
                       f"{dtask}.")
    for a, s in A["sequential"].items():
        if a != REF:
            out.append(f"- sequential, {LABELS[a]}: control {verdict(s['vs_kappa_low'])}; task-1 forgetting: "
                       f"{verdict(s['task1_forgetting_vs_kappa_low'], LOSES_TASK1)}; before task 2 (descriptive), "
                       f"task 1: {verdict(s['task1_gain_vs_kappa_low'], _words('seq_task1_gain'))}.")
    disagree = [k for k, c in A["comparisons"].items()
                if c.get("ci95") is not None and c.get("t_decision") is not None and c["t_decision"] != c["decision"]]
    if disagree:
        out.append("- Where the paired t over seeds (Holm over the same family) disagrees with the pre-registered "
                   "bootstrap verdict: " + ", ".join(disagree) + ".")
    mc = A.get("monte_carlo")
    if mc:
        out.append(f"- Bootstrap replicates: {mc['B']:,} (raised from {mc['B_start']:,} until no verdict is within "
                   f"{mc['k']:g} Monte-Carlo SEs of α = {mc['alpha']:g}): "
                   + ("no verdict can flip by Monte-Carlo noise." if mc["stable"] else
                      f"still at risk at the maximum: {', '.join(mc['at_risk'])}."))
    return out


def summary(cfg: V2Design, A: Mapping[str, Any], base: Mapping[str, Any], runs: Mapping[str, Any],
            ready: Sequence[V2RunSpec], waiting: Sequence[str]) -> Dict[str, Any]:
    """The content of ``summary.json`` (strict JSON: non-finite values are ``null``) from
    :func:`analyse_stable`'s ``A``."""
    return finite({"arms": {a: dict(m) for a, m in A["main"].items()},
            "long": {"arms": A["long"]},
            "sequential": {"arms": {a: dict(m) for a, m in A["sequential"].items()}},
            "exploratory_not_preregistered": A["exploratory"],
            "L_star": A["L_star"], "L_long": A["L_long"], "chosen_lr": A["chosen_lr"],
            "endpoint": "control-loss increase (nats) at task loss L*, interpolated on the curve windows",
            "verdict_rule": ("pre-registered, on the bootstrap: 'more'/'less' only where the bootstrap 95% CI excludes 0 "
                             "and the Holm-adjusted bootstrap p < 0.05 (decision +1/-1, else 0); t_decision applies "
                             "the same rule to the paired-t interval and its Holm-adjusted p, for comparison only"),
            "base": {k: v for k, v in base.items() if not k.endswith("_pw")},
            "config": cfg.to_dict(), "compute": A["compute"], "bootstrap_replicates": A["bootstrap"],
            "monte_carlo": A.get("monte_carlo"),
            "finished_runs": sorted(runs), "missing_ready": [s.run_id for s in ready], "missing_waiting": list(waiting),
            "headline": [h.replace("\\*", "*") for h in headline(A, cfg)]})


COLORS = {"kappa_low": "tab:blue", "random_kind": "tab:orange", "kappa_high_kind": "tab:red",
          "kappa_low_kind": "tab:cyan", "random": "tab:gray", "spectrum": "tab:purple", "lora": "tab:green",
          "full": "black"}


def _frontier(ax, runs_by_seed, base, color, label, ls="-"):
    """Mean Δcontrol over seeds on a common task-loss grid, band = min…max over seeds."""
    curves = []
    for r in runs_by_seed:
        pts = [c for c in r["curve"] if "task_curve_loss" in c]
        T = np.array([c["task_curve_loss"] for c in pts])
        C = np.array([c["control_curve_loss"] for c in pts]) - base["control_curve_loss"]
        Tm = np.minimum.accumulate(T)                   # the frontier reached so far
        curves.append((Tm, C))
    if not curves:
        return
    lo = max(c[0].min() for c in curves)
    hi = base["task_curve_loss"]
    if not lo < hi:
        return
    grid = np.linspace(hi, lo, 40)
    ys = []
    for Tm, C in curves:
        y = []
        for g in grid:
            x = st.crossing(list(Tm), list(C), g)
            y.append(np.nan if x is None else x[0])
        ys.append(y)
    Y = np.array(ys)
    ax.plot(grid, np.nanmean(Y, 0), ls, color=color, lw=1.8, label=f"{label} ({len(curves)} seed{'s' * (len(curves) > 1)})")
    if len(curves) > 1:
        ax.fill_between(grid, np.nanmin(Y, 0), np.nanmax(Y, 0), color=color, alpha=0.15, lw=0)


def write_plots(cfg: V2Design, out: Path, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any],
                A: Mapping[str, Any]) -> List[Path]:
    """``frontier.png`` (main and long phases: Δcontrol against the task loss at the chosen LR, mean
    over seeds, band = seed range) and ``sequential.png`` (task 1 then task 2: control, task-1 and
    task-2 losses, one line per seed). matplotlib is imported here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: List[Path] = []
    chosen = A["chosen_lr"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, phase, arms in ((axes[0], "main", arm_order(cfg.arms)), (axes[1], "long", arm_order(cfg.long_arms))):
        for a in arms:
            if chosen.get(a) is None:
                continue
            rs = [runs[k] for k in (V2RunSpec(a, chosen[a], s, phase).run_id for s in cfg.seeds) if k in runs]
            _frontier(ax, rs, base, COLORS[a], f"{LABELS[a]}, lr {chosen[a]:g}")
        ax.axvline(A["L_star"], color="k", ls=":", lw=0.8, label="L*")
        ax.axhline(0, color="k", lw=0.5)
        ax.invert_xaxis()
        ax.set_xlabel("held-out task loss (curve windows; lower = more adapted →)")
        ax.set_ylabel("control-loss increase (nats; up = forgetting)")
        ax.set_title(f"{phase} phase ({cfg.steps if phase == 'main' else cfg.long_steps} steps): mean over seeds, "
                     "band = seed range", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Forgetting–adaptation frontier, {cfg.model.split(' (')[0]}, budget {cfg.budget} of the linear weights",
                 fontsize=10)
    fig.tight_layout()
    p = out / "frontier.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    seq = [(a, [runs[k] for k in (V2RunSpec(a, chosen[a], s, "seq").run_id for s in cfg.seeds) if k in runs])
           for a in arm_order(cfg.seq_arms) if chosen.get(a) is not None]
    if any(rs for _, rs in seq):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        keys = (("control_curve_loss", "control", base["control_curve_loss"]),
                ("task_curve_loss", "task 1", base["task_curve_loss"]),
                ("task2_curve_loss", "task 2", base["task2_curve_loss"]))
        for ax, (k, name, b0) in zip(axes, keys):
            for a, rs in seq:
                for i, r in enumerate(rs):
                    pts = r["task1"]["curve"] + r["task2"]["curve"][1:]
                    ax.plot([c["step"] for c in pts], [c[k] - b0 for c in pts], "-o", ms=2, color=COLORS[a],
                            alpha=0.8, label=LABELS[a] if i == 0 else None)
            ax.axvline(cfg.steps, color="k", ls=":", lw=0.8)
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xlabel(f"step (task 1 → task 2 at {cfg.steps})")
            ax.set_ylabel(f"{name} loss − base (nats)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Sequential phase: {cfg.task} then {cfg.task2} (one line per seed)", fontsize=10)
        fig.tight_layout()
        p = out / "sequential.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made
