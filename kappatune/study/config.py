r"""The study file: every rule of a forgetting study, declared before its first run.

A :class:`StudyConfig` holds three kinds of settings:

* **run settings** (:meth:`StudyConfig.run_settings`, fingerprinted by
  :meth:`StudyConfig.settings_fingerprint`): the arms and their learning-rate grids, the selection
  budget, seeds, steps, batch, evaluation grid and windows, blends. Every run file carries the
  fingerprint; a run made under other settings is never mixed in.
* **analysis rules** (:meth:`StudyConfig.analysis_rules`): the task-loss levels, the area range,
  the comparisons and the family Holm's correction runs over, the verdict rule. They are written
  with the study file before any run and quoted by the report; changing them afterwards is an
  amendment the report points out.
* **descriptions**: the model and corpora as given, a title, the pre-registration (if any).

The file is JSON (``study.json`` in the results folder, format ``kappatune-study``); it can be written
in advance (``kappatune study ... --dry-run --save-study FILE``), committed as a pre-registration, and
run with ``kappatune study --study FILE``.

Arms (:class:`Arm`) are written ``KIND[+OPTION]...``: ``kappa_low`` (the library's selection at the
budget), ``kappa_high`` (highest κ, κ-low's parameter count), ``random`` (random tensors, κ-low's
parameter count), ``random_kind`` (random tensors of κ-low's module kinds, in its counts),
``kappa_high_kind`` (the highest-κ tensors of κ-low's module kinds, in its counts),
``kappa_low_kind`` (the budget's policy applied within each module kind), ``spectrum`` (Spectrum's
SNR, highest first within each module kind, κ-low's parameter count), ``names=FILE`` (the
parameter names in ``FILE``, one per line), ``lora`` (PEFT LoRA at κ-low's parameter count) and
``full`` (every parameter). Options: ``+decay`` (``decay_to_init`` over the arm's λ grid),
``+wd=X`` (AdamW weight decay), ``+cosine`` (cosine LR schedule). Each arm runs every point of its grid
(learning rates × λ) on every seed.

Evaluation grids (:func:`parse_eval_at`) are written ``0,5,10,15,20,30,40,+20``: the listed steps,
then every 20 steps, and always the last step.

**Task 2** (optional): with ``task2_steps > 0``, every run of the arms in ``task2_arms``, after its
``steps`` on the task and its last evaluation, trains ``task2_steps`` more steps on a second task
corpus (the same tensors, adapter or parameters, AdamW's moments reset) and is evaluated on the task,
the control and task 2 (:attr:`StudyConfig.task2_eval_at`, counted from task 2's start). The task-2
settings join the run settings and the study file only when task 2 is on, so a study without it is
written, fingerprinted and resumed exactly as before task 2 existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..refs import DEFAULT_MAX_DIM

__all__ = ["StudyConfig", "Arm", "StudyConfigError", "load_study", "default_config", "quick_config",
           "ARM_KINDS"]

FORMAT = "kappatune-study"
VERSION = 1

ARM_KINDS = ("kappa_low", "kappa_high", "random", "random_kind", "kappa_high_kind", "kappa_low_kind", "spectrum",
             "names", "lora", "full")
"""Every kind of arm (see the module docstring)."""
SELECTIVE_KINDS = ("kappa_low", "kappa_high", "random", "random_kind", "kappa_high_kind", "kappa_low_kind", "spectrum",
                   "names")
"""Arms that train whole tensors chosen from the κ table."""
DEFAULT_LRS: Dict[str, Tuple[float, ...]] = {"selective": (2.5e-4, 5e-4, 1e-3), "lora": (2.5e-4, 5e-4, 1e-3),
                                             "full": (3e-6, 1e-5, 3e-5)}
"""Learning-rate grids used when ``--lrs`` names none for an arm (by family of arm)."""
DEFAULT_DECAYS: Tuple[float, ...] = (1.0, 10.0, 100.0)
r"""λ grid of a ``+decay`` arm when ``--decays`` names none: each step pulls the trained tensors back
by :math:`\text{lr}\cdot\lambda\,(W - W_0)`."""
DEFAULT_EVAL_AT = "0,5,10,15,20,30,40,+20"
EMBEDDINGS = r"(embed_tokens|embed_positions|wte|wpe|lm_head|embed_out)"
"""Tensors left out of the κ table (and so of every selective arm): embeddings and the LM head."""
EVIDENCE_MIN_SEEDS = 3
EVIDENCE_MIN_STEPS = 100
"""A study with fewer seeds or steps is reported as a smoke test, never as evidence."""

_ARM_NAME = re.compile(r"^[A-Za-z0-9_.+=-]+$")


class StudyConfigError(ValueError):
    """A bad study setting: the message is one line naming the setting and the fix."""


# ----------------------------------------------------------------------------------------------
# arms
@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning, with its hyperparameter grid.

    Args:
        name (str): the arm's id in run files and reports (``kappa_low``, ``kappa_low+decay``, …).
        kind (str): one of :data:`ARM_KINDS`.
        lrs (tuple of float): the learning-rate grid.
        decays (tuple of float, optional): the ``decay_to_init`` λ grid. Default: ``(0.0,)`` (off).
        weight_decay (float, optional): AdamW weight decay of this arm. Default: ``None`` (the study's).
        schedule (str, optional): ``"constant"`` or ``"cosine"``. Default: ``None`` (the study's).
        names (tuple of str, optional): the parameter names of a ``names`` arm. Default: ``None``.
    """

    name: str
    kind: str
    lrs: Tuple[float, ...]
    decays: Tuple[float, ...] = (0.0,)
    weight_decay: Optional[float] = None
    schedule: Optional[str] = None
    names: Optional[Tuple[str, ...]] = None

    @property
    def selective(self) -> bool:
        """Whether the arm trains whole tensors chosen from the κ table."""
        return self.kind in SELECTIVE_KINDS

    def grid(self) -> List[Tuple[float, float]]:
        """Every ``(lr, decay)`` point of the arm, in grid order."""
        return [(lr, d) for d in self.decays for lr in self.lrs]

    def to_dict(self) -> Dict[str, Any]:
        """The arm as JSON-ready values."""
        return {"name": self.name, "kind": self.kind, "lrs": list(self.lrs), "decays": list(self.decays),
                "weight_decay": self.weight_decay, "schedule": self.schedule,
                "names": None if self.names is None else list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Arm":
        """An arm from :meth:`to_dict`'s values (validated).

        Args:
            d (mapping): ``name``, ``kind`` and ``lrs``, and optionally ``decays``, ``weight_decay``,
                ``schedule`` and ``names`` (missing or ``None``: the default of :class:`Arm`).

        Returns:
            Arm: the arm, validated (:meth:`validate`).

        Raises:
            StudyConfigError: a missing or malformed value, or one the study cannot run.
        """
        try:
            arm = cls(name=str(d["name"]), kind=str(d["kind"]), lrs=tuple(float(x) for x in d["lrs"]),
                      decays=tuple(float(x) for x in d.get("decays") or (0.0,)),
                      weight_decay=None if d.get("weight_decay") is None else float(d["weight_decay"]),
                      schedule=d.get("schedule"),
                      names=None if d.get("names") is None else tuple(str(n) for n in d["names"]))
        except (KeyError, TypeError, ValueError) as e:
            raise StudyConfigError(f"arm {dict(d).get('name', '?')!r}: malformed ({type(e).__name__}: {e})") from None
        arm.validate()
        return arm

    def validate(self) -> None:
        """Raise :class:`StudyConfigError` for a value the study cannot run."""
        where = f"arm {self.name!r}"
        if not _ARM_NAME.match(self.name):
            raise StudyConfigError(f"{where}: a name may hold only letters, digits and _ . + = -")
        if self.kind not in ARM_KINDS:
            raise StudyConfigError(f"{where}: unknown kind {self.kind!r}; use one of {', '.join(ARM_KINDS)}")
        if not self.lrs:
            raise StudyConfigError(f"{where}: empty learning-rate grid")
        for lr in self.lrs:
            if not (math.isfinite(lr) and lr > 0):
                raise StudyConfigError(f"{where}: learning rate {lr!r} must be a number > 0")
        if len(set(self.lrs)) != len(self.lrs):
            raise StudyConfigError(f"{where}: learning rate listed twice in {list(self.lrs)}")
        for d in self.decays:
            if not (math.isfinite(d) and d >= 0):
                raise StudyConfigError(f"{where}: decay_to_init λ {d!r} must be a number >= 0")
        if len(set(self.decays)) != len(self.decays):
            raise StudyConfigError(f"{where}: λ listed twice in {list(self.decays)}")
        if self.kind == "lora" and any(self.decays):
            raise StudyConfigError(f"{where}: decay_to_init is not supported for LoRA (it acts on whole tensors); "
                                   "drop +decay")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise StudyConfigError(f"{where}: weight decay {self.weight_decay!r} must be >= 0")
        if self.schedule not in (None, "constant", "cosine"):
            raise StudyConfigError(f"{where}: schedule {self.schedule!r} must be constant or cosine")
        if (self.kind == "names") != (self.names is not None):
            raise StudyConfigError(f"{where}: a names arm needs its list of names (and only it has one)")
        if self.names is not None and not self.names:
            raise StudyConfigError(f"{where}: the list of names is empty")


def _arm_family(kind: str) -> str:
    return "full" if kind == "full" else "lora" if kind == "lora" else "selective"


def parse_arm(text: str, lrs: Optional[Sequence[float]] = None, decays: Optional[Sequence[float]] = None) -> Arm:
    """An :class:`Arm` from its command-line spelling ``KIND[+OPTION]...``.

    Args:
        text (str): e.g. ``kappa_low``, ``kappa_low+decay``, ``full+wd=0.01+cosine``,
            ``names=my_tensors.txt``.
        lrs (sequence of float, optional): the learning-rate grid. Default: ``None``
            (:data:`DEFAULT_LRS` of the arm's family).
        decays (sequence of float, optional): the λ grid of a ``+decay`` arm. Default: ``None``
            (:data:`DEFAULT_DECAYS`).

    Raises:
        StudyConfigError: an unknown kind or option, an unreadable names file.
    """
    t = text.strip()
    if not t:
        raise StudyConfigError("--arms: an empty arm name")
    head, *opts = t.split("+")
    names: Optional[Tuple[str, ...]] = None
    if head.startswith("names="):
        path = Path(head[len("names="):]).expanduser()
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StudyConfigError(f"--arms {text}: cannot read the names file {path} ({e.__class__.__name__}); "
                                   "give a text file with one parameter name per line") from None
        names = tuple(ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.strip().startswith("#"))
        if not names:
            raise StudyConfigError(f"--arms {text}: {path} lists no parameter names")
        kind = "names"
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or "list"
        base_name = f"names-{stem}"
    else:
        kind = head
        base_name = head
        if kind not in ARM_KINDS or kind == "names":
            raise StudyConfigError(f"--arms {text}: unknown arm {head!r}; use one of "
                                   f"{', '.join(k for k in ARM_KINDS if k != 'names')} or names=FILE")
    decay = False
    wd: Optional[float] = None
    schedule: Optional[str] = None
    for o in opts:
        if o == "decay":
            decay = True
        elif o.startswith("wd="):
            try:
                wd = float(o[3:])
            except ValueError:
                raise StudyConfigError(f"--arms {text}: weight decay {o[3:]!r} is not a number") from None
        elif o in ("cosine", "constant"):
            schedule = o
        else:
            raise StudyConfigError(f"--arms {text}: unknown option +{o}; use +decay, +wd=X or +cosine")
    name = "+".join([base_name, *opts])
    arm = Arm(name=name, kind=kind, lrs=tuple(lrs) if lrs else DEFAULT_LRS[_arm_family(kind)],
              decays=(tuple(decays) if decays else DEFAULT_DECAYS) if decay else (0.0,),
              weight_decay=wd, schedule=schedule, names=names)
    if decay and 0.0 in arm.decays and len(arm.decays) == 1:
        raise StudyConfigError(f"--arms {text}: +decay with λ = 0 only is the arm without +decay")
    arm.validate()
    return arm


# ----------------------------------------------------------------------------------------------
# small parsers
def parse_floats(text: str, what: str, positive: bool = True) -> Tuple[float, ...]:
    """``"1e-4,3e-4"`` → ``(1e-4, 3e-4)``; a one-line error naming ``what`` otherwise."""
    out = []
    for tok in str(text).replace(" ", "").split(","):
        if not tok:
            continue
        try:
            v = float(tok)
        except ValueError:
            raise StudyConfigError(f"{what}: {tok!r} is not a number (give a comma-separated list)") from None
        if not math.isfinite(v) or (positive and v <= 0) or (not positive and v < 0):
            raise StudyConfigError(f"{what}: {tok!r} must be a number {'> 0' if positive else '>= 0'}")
        out.append(v)
    if not out:
        raise StudyConfigError(f"{what}: give at least one number")
    return tuple(out)


def parse_seeds(text: str) -> Tuple[int, ...]:
    """``"3"`` → ``(0, 1, 2)``; ``"0,1,5"`` → ``(0, 1, 5)``."""
    t = str(text).strip()
    try:
        if "," not in t:
            n = int(t)
            if n < 1:
                raise ValueError
            return tuple(range(n))
        seeds = tuple(int(x) for x in t.split(",") if x.strip())
    except ValueError:
        raise StudyConfigError(f"--seeds {text}: give a count (3) or a list of seeds (0,1,2)") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise StudyConfigError(f"--seeds {text}: seeds must be distinct whole numbers >= 0")
    return seeds


def parse_eval_at(spec: str, steps: int) -> Tuple[int, ...]:
    """The evaluation steps of ``spec`` for a run of ``steps`` steps.

    ``"0,5,10,15,20,30,40,+20"``: the listed steps (those ``<= steps``), then every 20 steps after the
    last listed one; step 0 and the last step are always included.

    Args:
        spec (str): the grid.
        steps (int): the run length.

    Raises:
        StudyConfigError: a malformed grid.
    """
    pts = {0, steps}
    every: Optional[int] = None
    last = 0
    for tok in str(spec).replace(" ", "").split(","):
        if not tok:
            continue
        try:
            if tok.startswith("+"):
                every = int(tok[1:])
                if every < 1:
                    raise ValueError
                continue
            v = int(tok)
            if v < 0:
                raise ValueError
        except ValueError:
            raise StudyConfigError(f"--eval-at {spec}: {tok!r} is not a step (use e.g. 0,5,10,20,+20)") from None
        if every is not None:
            raise StudyConfigError(f"--eval-at {spec}: '+N' (every N steps) must come last")
        last = max(last, v)
        if v <= steps:
            pts.add(v)
    if every is not None:
        s = last + every
        while s < steps:
            pts.add(s)
            s += every
    return tuple(sorted(pts))


def parse_budget(text: str) -> Dict[str, Any]:
    """``--budget`` → a selection policy ``{name: value}`` for ``KappaTable.select``.

    ``top_fraction=0.1`` (the quickstart's), ``param_budget=0.012`` / ``param_budget=5%`` /
    ``param_budget=2000000``, ``num_tensors=8``.
    """
    t = str(text).strip()
    key, sep, val = t.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in ("top_fraction", "param_budget", "num_tensors"):
        raise StudyConfigError(f"--budget {text}: give top_fraction=F, param_budget=B (fraction, % or count) or "
                               "num_tensors=K")
    val = val.strip()
    try:
        if key == "num_tensors":
            v: Any = int(val)
            if v < 1:
                raise ValueError
        elif key == "param_budget" and val.endswith("%"):
            v = float(val[:-1]) / 100.0
        elif key == "param_budget" and val.isdigit():
            v = int(val)
        else:
            v = float(val)
        if isinstance(v, float) and not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError
    except ValueError:
        raise StudyConfigError(f"--budget {text}: {val!r} is not a valid {key} (a fraction in (0, 1], a % or a "
                               "whole count)") from None
    return {key: v}


# ----------------------------------------------------------------------------------------------
# the study file
@dataclass
class StudyConfig:
    r"""Every setting of a study (see the module docstring for the three kinds).

    Args:
        title (str): a heading for the report. Default: ``"Forgetting study"``.
        preset (str): ``"quick"``, ``"default"`` or ``"custom"`` (descriptive). Default: ``"default"``.
        preregistration (str, optional): path or link of the pre-registration the study follows; the
            report links it only when set. Default: ``None``.
        model (str): the model as given (``smollm2``, a folder or a ``.gguf`` file). Default: ``"smollm2"``.
        corpora (dict): ``{role: {"files": [...], "description": str}}`` for ``task``, ``control``
            and, with task 2, ``task2`` (``files`` ``None``: the offline default). Default: empty (the
            offline defaults).
        text_field (str): the JSON/JSONL field with the text. Default: ``"text"``.
        budget (dict): the selection policy of ``kappa_low`` (``{"top_fraction": 0.1}``, the
            quickstart's). Default: ``{"top_fraction": 0.1}``.
        arms (tuple of Arm): the arms. Default: none.
        blend_arms (tuple of str): arms whose runs are also evaluated at
            :math:`W_0 + \alpha (W_1 - W_0)` for each ``alphas`` (no training). Default: none.
        alphas (tuple of float): the blend factors, in ``(0, 1)``. Default: ``(0.25, 0.5, 0.75)``.
        seeds (tuple of int): the seeds; every grid point of every arm runs on each. Default: ``(0, 1, 2)``.
        steps (int): training steps per run. Default: ``200``.
        batch (int): windows per step. Default: ``4``.
        seq_len (int): tokens per window. Default: ``64``.
        eval_spec (str): the evaluation grid as given. Default: :data:`DEFAULT_EVAL_AT`.
        eval_at (tuple of int): the resolved evaluation steps (:func:`parse_eval_at`). Default: from
            ``eval_spec`` and ``steps``.
        curve_windows (int): held-out windows per corpus evaluated at every ``eval_at`` step. Default: ``64``.
        final_windows (int): other held-out windows per corpus, evaluated after the last step. Default: ``128``.
        task2_steps (int): steps on the second task after the first, for the runs of ``task2_arms``
            (0: no task 2). Default: ``0``.
        task2_arms (tuple of str): the arms whose runs go on to task 2. Default: every arm (when
            ``task2_steps > 0``).
        task2_eval_at (tuple of int): the evaluation steps of task 2, counted from its start.
            Default: ``eval_spec`` applied to ``task2_steps``.
        eval_batch (int): windows per evaluation forward pass. Default: ``16``.
        held_out (float): fraction of documents held out. Default: ``0.1``.
        data_seed (int): seed of the document split and window choice. Default: ``0``.
        weight_decay (float): AdamW weight decay. Default: ``0.0``.
        grad_clip (float): gradient-norm clip (0: off). Default: ``1.0``.
        schedule (str): ``"constant"`` or ``"cosine"`` LR. Default: ``"constant"``.
        precision (str): ``"fp32"`` or ``"bf16-autocast"`` (CUDA only). Default: ``"fp32"``.
        lora_alpha_over_r (float): LoRA's α / r. Default: ``2.0``.
        max_dim (int, optional): κ scan: skip tensors with a side longer than this. Default: ``16384``.
        exclude (str): κ scan: regex of tensors no selective arm may take. Default: :data:`EMBEDDINGS`.
        levels (tuple of float): task-loss levels as drops below the base model's task loss (nats);
            Δcontrol is read on each arm's envelope at each. Default: ``(0.25, 0.35, 0.45, 0.6)``.
        area (tuple of float): the task-loss range (drops below base) of the area between envelopes.
            Default: ``(0.25, 0.6)``.
        reference (str, optional): the arm every other arm is compared with when ``comparisons`` is
            empty. Default: ``None`` (``kappa_low`` if present, else the first arm).
        comparisons (tuple of (str, str)): ``(a, b)`` pairs compared as ``a − b``, paired over seeds;
            blend arms are written ``blend:ARM``. Default: every arm against the reference, and each
            blend against its arm.
        family (tuple of str): the endpoints Holm's correction runs over jointly, with every
            comparison (``level:0.35``, ``area``). Default: every level and the area.
        alpha (float): family-wise level. Default: ``0.05``.
        verdict_on (str): ``"both"`` (a difference is declared only when the bootstrap and the
            paired-t test both find it), ``"bootstrap"`` or ``"t"``. Default: ``"both"``.
        bootstrap_seed (int): seed of the bootstrap generators. Default: ``12345``.
        bootstrap_start (int): the first replicate count; raised until no verdict can flip by
            Monte-Carlo noise. Default: ``2000``.
        bootstrap_max (int): the most replicates. Default: ``64000``.
    """

    title: str = "Forgetting study"
    preset: str = "default"
    preregistration: Optional[str] = None
    model: str = "smollm2"
    corpora: Dict[str, Any] = field(default_factory=dict)
    text_field: str = "text"
    budget: Dict[str, Any] = field(default_factory=lambda: {"top_fraction": 0.1})
    arms: Tuple[Arm, ...] = ()
    blend_arms: Tuple[str, ...] = ()
    alphas: Tuple[float, ...] = (0.25, 0.5, 0.75)
    seeds: Tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    batch: int = 4
    seq_len: int = 64
    eval_spec: str = DEFAULT_EVAL_AT
    eval_at: Tuple[int, ...] = ()
    curve_windows: int = 64
    final_windows: int = 128
    task2_steps: int = 0
    task2_arms: Tuple[str, ...] = ()
    task2_eval_at: Tuple[int, ...] = ()
    eval_batch: int = 16
    held_out: float = 0.1
    data_seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "constant"
    precision: str = "fp32"
    lora_alpha_over_r: float = 2.0
    max_dim: Optional[int] = DEFAULT_MAX_DIM
    exclude: str = EMBEDDINGS
    levels: Tuple[float, ...] = (0.25, 0.35, 0.45, 0.6)
    area: Tuple[float, float] = (0.25, 0.6)
    reference: Optional[str] = None
    comparisons: Tuple[Tuple[str, str], ...] = ()
    family: Tuple[str, ...] = ()
    alpha: float = 0.05
    verdict_on: str = "both"
    bootstrap_seed: int = 12345
    bootstrap_start: int = 2000
    bootstrap_max: int = 64000

    RUN_KEYS = ("budget", "arms", "blend_arms", "alphas", "seeds", "steps", "batch", "seq_len", "eval_at",
                "curve_windows", "final_windows", "eval_batch", "held_out", "data_seed", "weight_decay", "grad_clip",
                "schedule", "precision", "lora_alpha_over_r", "max_dim", "exclude", "text_field")
    TASK2_KEYS = ("task2_steps", "task2_arms", "task2_eval_at")
    """Run settings of task 2: in the study file and the fingerprint only when ``task2_steps > 0``."""
    ANALYSIS_KEYS = ("levels", "area", "reference", "comparisons", "family", "alpha", "verdict_on", "bootstrap_seed",
                     "bootstrap_start", "bootstrap_max")

    # -- derived ---------------------------------------------------------------------------------
    def resolved(self) -> "StudyConfig":
        """A copy with ``eval_at``, ``reference``, ``comparisons`` and ``family`` filled in and every
        value validated (:meth:`validate`)."""
        c = dataclasses.replace(self)
        c.arms = tuple(self.arms)
        if not c.eval_at:
            c.eval_at = parse_eval_at(c.eval_spec, c.steps)
        names = [a.name for a in c.arms]
        if isinstance(c.task2_steps, int) and c.task2_steps > 0:
            if not c.task2_arms:
                c.task2_arms = tuple(names)
            if not c.task2_eval_at:
                c.task2_eval_at = parse_eval_at(c.eval_spec, c.task2_steps)
        if c.reference is None and names:
            c.reference = "kappa_low" if "kappa_low" in names else names[0]
        if not c.comparisons and names:
            pairs = [(a, c.reference) for a in names if a != c.reference]
            pairs += [(f"blend:{a}", a) for a in c.blend_arms]
            c.comparisons = tuple(pairs)
        c.comparisons = tuple((str(a), str(b)) for a, b in c.comparisons)
        if not c.family:
            c.family = tuple([f"level:{x:g}" for x in c.levels] + ["area"])
        c.validate()
        return c

    def arm(self, name: str) -> Arm:
        """The arm called ``name``.

        Args:
            name (str): the arm's name (:attr:`Arm.name`, e.g. ``kappa_low+decay``).

        Returns:
            Arm: the first arm of :attr:`arms` with that name.

        Raises:
            KeyError: no arm of the study has that name (the message lists the arms).
        """
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm {name!r} in the study (arms: {', '.join(a.name for a in self.arms)})")

    @property
    def evidence_grade(self) -> bool:
        """Whether the design can give evidence (:data:`EVIDENCE_MIN_SEEDS` seeds and
        :data:`EVIDENCE_MIN_STEPS` steps, and not the quick preset); otherwise a smoke test."""
        return (self.preset != "quick" and len(self.seeds) >= EVIDENCE_MIN_SEEDS
                and self.steps >= EVIDENCE_MIN_STEPS)

    @property
    def task2(self) -> bool:
        """Whether the runs go on to a second task (``task2_steps > 0``)."""
        return self.task2_steps > 0

    def endpoints(self) -> List[str]:
        """Every endpoint the report computes: ``level:X`` for each level and ``area``."""
        return [f"level:{x:g}" for x in self.levels] + ["area"]

    def validate(self) -> None:
        """Raise :class:`StudyConfigError` (one line) for anything the study cannot run or analyse."""
        if not self.arms:
            raise StudyConfigError("--arms: give at least one arm")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise StudyConfigError(f"--arms: {dup[0]!r} is listed twice")
        for a in self.arms:
            a.validate()
        for b in self.blend_arms:
            if b not in names:
                raise StudyConfigError(f"--blend {b}: not one of the arms ({', '.join(names)})")
        for x in self.alphas:
            if not 0 < x < 1:
                raise StudyConfigError(f"--alphas: {x:g} must lie strictly between 0 and 1")
        checks = [("--steps", self.steps, 1), ("batch", self.batch, 1), ("seq_len", self.seq_len, 2),
                  ("curve_windows", self.curve_windows, 2), ("final_windows", self.final_windows, 2),
                  ("eval_batch", self.eval_batch, 1)]
        for what, v, low in checks:
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise StudyConfigError(f"{what}: {v!r} must be a whole number >= {low}")
        if not self.seeds:
            raise StudyConfigError("--seeds: give at least one seed")
        if isinstance(self.task2_steps, bool) or not isinstance(self.task2_steps, int) or self.task2_steps < 0:
            raise StudyConfigError(f"--task2-steps: {self.task2_steps!r} must be a whole number >= 0")
        if self.task2_steps:
            for a in self.task2_arms:
                if a not in names:
                    raise StudyConfigError(f"--task2-arms {a}: not one of the arms ({', '.join(names)})")
            dup = sorted({a for a in self.task2_arms if list(self.task2_arms).count(a) > 1})
            if dup:
                raise StudyConfigError(f"--task2-arms: {dup[0]!r} is listed twice; list each arm once")
            t2 = list(self.task2_eval_at)
            if t2 != sorted(set(t2)) or not t2 or t2[0] != 0 or t2[-1] != self.task2_steps:
                raise StudyConfigError(f"task2_eval_at {t2}: must rise from 0 to the last step of task 2 "
                                       f"({self.task2_steps})")
        elif self.task2_arms or self.task2_eval_at:
            raise StudyConfigError("--task2-arms: task 2 is off (give --task2 FILE or --task2-steps N)")
        if not 0 < self.held_out < 1:
            raise StudyConfigError(f"held_out: {self.held_out} must lie in (0, 1)")
        if self.schedule not in ("constant", "cosine"):
            raise StudyConfigError(f"schedule {self.schedule!r} must be constant or cosine")
        if self.precision not in ("fp32", "bf16-autocast"):
            raise StudyConfigError(f"precision {self.precision!r} must be fp32 or bf16-autocast")
        if list(self.eval_at) != sorted(set(self.eval_at)) or self.eval_at[0] != 0 or self.eval_at[-1] != self.steps:
            raise StudyConfigError(f"eval_at {list(self.eval_at)}: must rise from 0 to the last step ({self.steps})")
        if not self.levels or any(not (math.isfinite(x) and x > 0) for x in self.levels):
            raise StudyConfigError(f"--levels {list(self.levels)}: give drops below the base task loss, each > 0")
        if list(self.levels) != sorted(set(self.levels)):
            raise StudyConfigError(f"--levels {list(self.levels)}: list distinct drops in increasing order")
        lo, hi = self.area
        if not (0 <= lo < hi):
            raise StudyConfigError(f"--area {lo:g},{hi:g}: give two drops below base, the first smaller")
        known = set(names) | {f"blend:{b}" for b in self.blend_arms}
        for a, b in self.comparisons:
            for x in (a, b):
                if x not in known:
                    raise StudyConfigError(f"--compare {a}/{b}: {x!r} is not an arm of the study "
                                           f"({', '.join(sorted(known))})")
            if a == b:
                raise StudyConfigError(f"--compare {a}/{b}: an arm compared with itself")
        ends = set(self.endpoints())
        for e in self.family:
            if e not in ends:
                raise StudyConfigError(f"family: {e!r} is not an endpoint of the study ({', '.join(sorted(ends))})")
        if self.verdict_on not in ("both", "bootstrap", "t"):
            raise StudyConfigError(f"verdict_on {self.verdict_on!r} must be both, bootstrap or t")
        if not 0 < self.alpha < 1:
            raise StudyConfigError(f"alpha {self.alpha} must lie in (0, 1)")
        if not 2 <= self.bootstrap_start <= self.bootstrap_max:
            raise StudyConfigError(f"bootstrap replicates: start {self.bootstrap_start} must be >= 2 and <= the "
                                   f"maximum {self.bootstrap_max}")

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The study file's content (JSON-ready)."""
        d: Dict[str, Any] = {"format": FORMAT, "version": VERSION}
        for f in dataclasses.fields(self):
            if f.name in self.TASK2_KEYS and not self.task2_steps:
                continue                                   # a study without task 2 is written as before it existed
            v = getattr(self, f.name)
            if f.name == "arms":
                v = [a.to_dict() for a in v]
            elif f.name == "comparisons":
                v = [list(p) for p in v]
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "study file") -> "StudyConfig":
        """A config from :meth:`to_dict`'s values, resolved (:meth:`resolved`).

        Args:
            d (mapping): a study file's content: ``format`` (``"kappatune-study"``), ``version`` (at
                most this kappatune's) and any fields of :class:`StudyConfig` (a missing one takes its
                default).
            source (str, optional): what ``d`` came from, the start of every error message (e.g. the
                file's path). Default: ``"study file"``.

        Returns:
            StudyConfig: the study, with its defaults filled in and every value validated.

        Raises:
            StudyConfigError: another format, a newer version, an unknown setting, or a malformed or
                invalid value (one line naming ``source`` and the setting).
        """
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise StudyConfigError(f"{source}: not a kappatune study file (format {FORMAT!r} expected)")
        if not isinstance(d.get("version"), int) or d["version"] > VERSION:
            raise StudyConfigError(f"{source}: study file version {d.get('version')!r} is not supported here")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"format", "version"})
        if unknown:
            raise StudyConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        kw: Dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                if f.name not in d:
                    continue
                v = d[f.name]
                if f.name == "arms":
                    v = tuple(Arm.from_dict(a) for a in v)
                elif f.name == "comparisons":
                    v = tuple((str(a), str(b)) for a, b in v)
                elif f.name in ("seeds", "eval_at", "task2_eval_at"):
                    v = tuple(int(x) for x in v)
                elif f.name in ("alphas", "levels", "area"):
                    v = tuple(float(x) for x in v)
                elif f.name in ("blend_arms", "family", "task2_arms"):
                    v = tuple(str(x) for x in v)
                kw[f.name] = v
            cfg = cls(**kw)
        except StudyConfigError as e:
            raise StudyConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise StudyConfigError(f"{source}: malformed ({type(e).__name__}: {e})") from None
        try:
            return cfg.resolved()
        except StudyConfigError as e:
            raise StudyConfigError(f"{source}: {e}") from None

    def run_settings(self) -> Dict[str, Any]:
        """The settings that change what a run computes (fingerprinted)."""
        d = self.to_dict()
        return {k: d[k] for k in self.RUN_KEYS + (self.TASK2_KEYS if self.task2_steps else ())}

    def analysis_rules(self) -> Dict[str, Any]:
        """The declared analysis: levels, area, comparisons, family, verdict rule."""
        d = self.to_dict()
        return {k: d[k] for k in self.ANALYSIS_KEYS}

    def settings_fingerprint(self) -> str:
        """12 hex digits of SHA-256 over :meth:`run_settings` (canonical JSON)."""
        return _fingerprint(self.run_settings())

    def analysis_fingerprint(self) -> str:
        """12 hex digits of SHA-256 over :meth:`analysis_rules`."""
        return _fingerprint(self.analysis_rules())


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def differences(before: Mapping[str, Any], now: Mapping[str, Any], limit: int = 3) -> str:
    """What differs between two settings dicts, in one line: ``"steps 200 here vs 20 in the folder"``.

    Args:
        before (mapping): the settings on record (the results folder's).
        now (mapping): the settings of this command.
        limit (int, optional): how many differences to name. Default: ``3``.
    """
    keys = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]

    def short(v: Any) -> str:
        s = json.dumps(v, sort_keys=True)
        return s if len(s) <= 60 else s[:57] + "..."

    parts = [f"{k} {short(now.get(k))} now vs {short(before.get(k))} in the folder" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"{len(keys) - limit} more")
    return "; ".join(parts)


def load_study(path: "str | Path") -> StudyConfig:
    """Read a study file (``study.json``) with one-line errors naming it.

    Args:
        path (str or Path): a study file (written with ``--save-study``), or a results folder's
            ``study.json`` (its ``study`` section is read).

    Returns:
        StudyConfig: the study, resolved (:meth:`StudyConfig.from_dict`).

    Raises:
        StudyConfigError: a file that is missing, unreadable, not JSON, or not a valid study.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyConfigError(f"--study {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StudyConfigError(f"--study {p}: cannot read it ({e.__class__.__name__})") from None
    except json.JSONDecodeError as e:
        raise StudyConfigError(f"--study {p} line {e.lineno}: not JSON ({e.msg})") from None
    if isinstance(d, dict) and d.get("format") == "kappatune-study-folder":   # a results folder's study.json
        d = d.get("study")
    return StudyConfig.from_dict(d, source=str(p))


# ----------------------------------------------------------------------------------------------
# presets
def default_config(**overrides: Any) -> StudyConfig:
    """The default study: κ-low, random tensors of κ-low's kinds, LoRA and full fine-tuning at the
    quickstart's budget, 3 learning rates each, 3 seeds, 200 steps, the dense early evaluation grid."""
    arms = tuple(parse_arm(a) for a in ("kappa_low", "random_kind", "lora", "full"))
    cfg = StudyConfig(arms=arms, preset="default")
    return dataclasses.replace(cfg, **overrides)


def quick_config(**overrides: Any) -> StudyConfig:
    """``--quick``: a smoke test that runs end to end in minutes on 2 CPU cores (not evidence).

    κ-low at two learning rates (and its α = 0.5 blend), random tensors of κ-low's kinds and LoRA at
    one each; 2 seeds, 15 steps evaluated every 5, 8 + 8 windows per corpus, levels 0.1 / 0.2 / 0.3
    nats. Full fine-tuning (3× a κ-low step on the CPU) is left out to keep it short; add it with
    ``--arms kappa_low random_kind lora full``."""
    arms = (parse_arm("kappa_low", lrs=(5e-4, 1e-3)), parse_arm("random_kind", lrs=(1e-3,)),
            parse_arm("lora", lrs=(1e-3,)))
    cfg = StudyConfig(title="Forgetting study (quick smoke test)", preset="quick", arms=arms,
                      blend_arms=("kappa_low",), alphas=(0.5,), seeds=(0, 1), steps=15, eval_spec="0,5,10,15",
                      curve_windows=8, final_windows=8, eval_batch=16, levels=(0.1, 0.2, 0.3), area=(0.1, 0.3),
                      bootstrap_start=1000, bootstrap_max=4000)
    return dataclasses.replace(cfg, **overrides)
