r"""Which runs a study makes, in which order, and what they cost.

Every grid point of every arm (learning rate × ``decay_to_init`` λ) runs on every seed, so each
arm's lower envelope over its grid can be paired over seeds. The order is seed-major: all of seed
0's runs first (arms in the declared order), then seed 1's, …, so the paired comparisons fill in
seed by seed and a study stopped early has whole seeds.

**Cost.** :data:`STEP_CPU_S` and :data:`EVAL_CPU_S` are CPU seconds measured by the forgetting study
v2 on one CPU thread for SmolLM2-135M (batch 4 × 64 tokens; evaluation per 64-token window). A
run's cost is

.. math::  \text{steps}\cdot c_{\text{step}} + \big(2 (K - 1) n_{\text{curve}} + 2 n_{\text{final}}
           + 2 |\alpha| n_{\text{curve}}\big)\, c_{\text{eval}},

with :math:`K` evaluation points and :math:`|\alpha|` blend factors (blended arms only), scaled
linearly by the model's parameter count and the tokens per step for another model; a run that goes
on to a second task adds :math:`\text{steps}_2\, c_{\text{step}} + \big((3 K_2 - 2)\, n_{\text{curve}}
+ 3 n_{\text{final}}\big)\, c_{\text{eval}}` (:math:`K_2` evaluation points of task 2, three corpora). Finished runs
in the folder replace the table by their measured costs (:func:`measured_costs`).

| arm | training step (s) | evaluation per window (s) |
|---|---|---|
| selective (κ-low, random, …) | 1.37 | 0.12 |
| LoRA | 2.08 | 0.21 |
| full fine-tuning | 4.31 | 0.31 |

On a GPU the same runs take a small fraction of this; the table is for planning CPU work.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .config import Arm, StudyConfig

__all__ = ["RunSpec", "run_cost_s"]

STEP_CPU_S = {"selective": 1.37, "lora": 2.08, "full": 4.31}
"""CPU seconds per training step (1 thread, SmolLM2-135M, batch 4 × 64 tokens; forgetting study v2)."""
EVAL_CPU_S = {"selective": 0.12, "lora": 0.21, "full": 0.31}
"""CPU seconds per 64-token window evaluated (same setting)."""
REFERENCE_PARAMS = 134_515_008
"""Parameters of SmolLM2-135M, the model the table was measured on."""


@dataclass(frozen=True)
class RunSpec:
    """One run: an arm at one grid point on one seed.

    Args:
        arm (str): the arm's name.
        seed (int): the seed.
        lr (float): the learning rate.
        decay (float, optional): the ``decay_to_init`` λ (0: off). Default: ``0.0``.
    """

    arm: str
    seed: int
    lr: float
    decay: float = 0.0

    @property
    def run_id(self) -> str:
        """``<arm>_s<seed>_lr<lr>[_decay<λ>]``: the run file's name."""
        return f"{self.arm}_s{self.seed}_lr{self.lr:g}" + (f"_decay{self.decay:g}" if self.decay else "")


def plan(cfg: StudyConfig, done: Mapping[str, Any] = ()) -> List[RunSpec]:
    """The runs of ``cfg`` not in ``done``, in run order (seed-major, arms as declared, each arm's grid
    in order)."""
    out = []
    for s in cfg.seeds:
        for a in cfg.arms:
            for lr, d in a.grid():
                spec = RunSpec(a.name, s, lr, d)
                if spec.run_id not in done:
                    out.append(spec)
    return out


def cost_family(arm: Arm) -> str:
    """``"full"``, ``"lora"`` or ``"selective"``: the row of the cost table."""
    return "full" if arm.kind == "full" else "lora" if arm.kind == "lora" else "selective"


def measured_costs(runs: Mapping[str, Mapping[str, Any]], cfg: StudyConfig) -> Dict[str, Tuple[float, float, int]]:
    """``{arm: (CPU s per step, CPU s per evaluated window, runs)}`` measured on finished runs (the
    arm's own runs, else those of its cost family)."""
    by_arm: Dict[str, List[Tuple[float, float]]] = {}
    for r in runs.values():
        t = r.get("timing") or {}
        steps, windows = t.get("steps") or r.get("steps"), t.get("eval_windows")
        if not steps or not windows or t.get("train_cpu_s") is None or t.get("eval_cpu_s") is None:
            continue
        by_arm.setdefault(r["arm"], []).append((t["train_cpu_s"] / steps, t["eval_cpu_s"] / windows))
    fam: Dict[str, List[Tuple[float, float]]] = {}
    for a in cfg.arms:
        fam.setdefault(cost_family(a), []).extend(by_arm.get(a.name, []))
    out: Dict[str, Tuple[float, float, int]] = {}
    for a in cfg.arms:
        xs = by_arm.get(a.name) or fam.get(cost_family(a)) or []
        if xs:
            out[a.name] = (statistics.mean(x for x, _ in xs), statistics.mean(y for _, y in xs), len(xs))
    return out


def run_cost_s(cfg: StudyConfig, arm: Arm, model_params: Optional[int] = None,
               measured: Optional[Mapping[str, Tuple[float, float, int]]] = None) -> float:
    """Estimated CPU seconds of one run of ``arm`` (see the module docstring).

    Args:
        cfg (StudyConfig): the study.
        arm (Arm): the arm.
        model_params (int, optional): the model's parameter count (scales the table). Default:
            ``None`` (SmolLM2-135M's).
        measured (mapping, optional): :func:`measured_costs`; used instead of the table where present.
            Default: ``None``.
    """
    windows = (2 * (len(cfg.eval_at) - 1) * cfg.curve_windows + 2 * cfg.final_windows
               + (2 * len(cfg.alphas) * cfg.curve_windows if arm.name in cfg.blend_arms else 0))
    steps = cfg.steps
    if cfg.task2 and arm.name in cfg.task2_arms:
        steps += cfg.task2_steps
        windows += 3 * len(cfg.task2_eval_at) * cfg.curve_windows - 2 * cfg.curve_windows + 3 * cfg.final_windows
    if measured and arm.name in measured:
        step, ev, _ = measured[arm.name]
    else:
        scale = (model_params or REFERENCE_PARAMS) / REFERENCE_PARAMS
        f = cost_family(arm)
        step = STEP_CPU_S[f] * scale * cfg.batch * cfg.seq_len / 256
        ev = EVAL_CPU_S[f] * scale * cfg.seq_len / 64
    return steps * step + windows * ev


def format_duration(seconds: float) -> str:
    """``"1 h 05 min"``, ``"4 min 10 s"`` or ``"12 s"``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
