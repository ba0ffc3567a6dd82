"""What each arm trains: the tensors of a selective arm per seed, LoRA's rank, full fine-tuning.

Every selection goes through the library's selection API (:meth:`kappatune.KappaTable.select`), so
an arm follows the same rules as a user's selection:

* ``kappa_low``: ``table.select(**budget)``, the budget as the user gives it to kappatune
  (the quickstart's ``top_fraction=0.1`` by default); its parameter count is the study's *reference
  count*.
* ``kappa_high``: the highest-κ tensors that fit in the reference count (``select(param_budget=count)``
  on the table in descending κ).
* ``random``: a seeded random order of the tensors, filled to the reference count the same way.
* ``random_kind``: per module kind, a seeded random draw of as many tensors as ``kappa_low`` took of
  that kind (the control that separates κ from kind); a fresh draw per seed.
* ``kappa_high_kind``: per module kind, the highest-κ tensors in ``kappa_low``'s counts (κ-low's
  composition at the other end of the κ ranking).
* ``kappa_low_kind``: ``table.select(**budget, group_by="kind")``, the budget's policy within each kind.
* ``spectrum``: Spectrum's rule (Hartford et al. 2024) at κ-low's parameter count: on the SNR table of
  the same tensors (``kappatune.scan(model, score="snr")``, highest SNR first),
  ``select(param_budget=count, group_by="kind")``, i.e. each module kind's proportional share of the
  count taken highest SNR first, what is left filled round-robin over the kinds
  (:class:`kappatune.selection.SelectionPolicy`).
* ``names``: an explicit list.
* ``lora``: PEFT LoRA on every linear module in the κ table, at the rank whose adapter size is
  closest to the reference count; ``full``: every parameter.

Options of an arm (``+decay``, ``+wd=``, ``+cosine``) do not change what it trains: ``kappa_low+decay``
trains exactly ``kappa_low``'s tensors, and a random arm with an option draws what the arm without it
draws for the same seed (so the two are paired).

New selection rules register in :data:`SELECTORS` (``kind → function``); a rule that ranks by another
score than κ names it in :data:`SCORE_OF`, and :func:`selections` scans that score once for all seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import Arm, StudyConfig

__all__ = ["select_tensors", "ArmError", "SELECTORS"]


class ArmError(ValueError):
    """An arm that cannot be built on this model: one line naming the arm and the fix."""


def kinds_of(names: Sequence[str]) -> Dict[str, int]:
    """``{module kind: count}`` of ``names`` (:func:`kappatune.refs.module_kind`), sorted by kind."""
    from ..refs import module_kind

    out: Dict[str, int] = {}
    for n in names:
        k = module_kind(n)
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def reordered(table: Any, order: Sequence[str]) -> Any:
    """A :class:`~kappatune.KappaTable` of the same tensors whose ascending order is ``order``
    (each entry's κ replaced by its rank), so that ``select`` walks ``order``."""
    from ..table import KappaTable

    return KappaTable([dataclasses.replace(table[n], kappa=float(i + 1), snr=math.nan, score="kappa")
                       for i, n in enumerate(order)])


def _params(table: Any, names: Sequence[str]) -> int:
    return sum(table[n].numel for n in names)


def _kappa_low(table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
               scores: Mapping[str, Any]) -> Tuple[List[str], str]:
    return list(table.select(**budget)), f"table.select({_fmt(budget)})"


def _kappa_high(table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
                scores: Mapping[str, Any]) -> Tuple[List[str], str]:
    count = _params(table, ref)
    names = reordered(table, list(reversed(table.names))).select(param_budget=count)
    return list(names), f"highest κ first, every tensor that fits in κ-low's {count:,} parameters"


def _random(table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
            scores: Mapping[str, Any]) -> Tuple[List[str], str]:
    count = _params(table, ref)
    order = list(table.names)
    random.Random(f"random:{seed}").shuffle(order)
    names = reordered(table, order).select(param_budget=count)
    return list(names), f"a seeded random order (seed {seed}), every tensor that fits in κ-low's {count:,} parameters"


def _random_kind(table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
                 scores: Mapping[str, Any]) -> Tuple[List[str], str]:
    from ..refs import module_kind

    comp = kinds_of(ref)
    by_kind: Dict[str, List[str]] = {}
    for n in sorted(table.names):
        by_kind.setdefault(module_kind(n), []).append(n)
    rng = random.Random(f"random_kind:{seed}")
    names = [n for k, c in comp.items() for n in rng.sample(by_kind[k], c)]
    return names, f"per module kind, a seeded random draw (seed {seed}) of κ-low's counts {comp}"


def _kappa_high_kind(table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
                     scores: Mapping[str, Any]) -> Tuple[List[str], str]:
    from ..refs import module_kind

    comp = kinds_of(ref)
    by_kind: Dict[str, List[str]] = {}
    for n in table.names:                                      # ascending κ
        by_kind.setdefault(module_kind(n), []).append(n)
    names = [n for k, c in comp.items() for n in by_kind[k][::-1][:c]]
    return names, f"per module kind, the highest-κ tensors in κ-low's counts {comp}"


def _kappa_low_kind(table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
                    scores: Mapping[str, Any]) -> Tuple[List[str], str]:
    try:
        names = list(table.select(**budget, group_by="kind"))
    except ValueError as e:
        raise ArmError(f"arm kappa_low_kind: {e}".split(";")[0] + "; raise --budget or drop the arm") from None
    return names, f"table.select({_fmt(budget)}, group_by='kind')"


def _spectrum(table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
              scores: Mapping[str, Any]) -> Tuple[List[str], str]:
    count = _params(table, ref)
    names = scores["snr"].select(param_budget=count, group_by="kind")
    return list(names), (f"Spectrum's SNR, highest first within each module kind: scan(score='snr').select("
                         f"param_budget={count}, group_by='kind') (each kind's share of κ-low's {count:,} "
                         "parameters, the rest filled round-robin over the kinds)")


SELECTORS: Dict[str, Callable[[Any, Mapping[str, Any], int, Sequence[str], Mapping[str, Any]],
                              Tuple[List[str], str]]] = {
    "kappa_low": _kappa_low, "kappa_high": _kappa_high, "random": _random, "random_kind": _random_kind,
    "kappa_high_kind": _kappa_high_kind, "kappa_low_kind": _kappa_low_kind, "spectrum": _spectrum}
"""``kind → f(table, budget, seed, κ-low's names, scores) → (names, rule)`` of the selective arms;
``scores`` maps a score name to the table of that score over the same tensors (:data:`SCORE_OF`)."""

SCORE_OF: Dict[str, str] = {"spectrum": "snr"}
"""``kind → score`` of the arms that rank by another score than κ (:data:`kappatune.table.SCORES`)."""


def _fmt(budget: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in budget.items())


def score_table(model: Any, table: Any, score: str, cache: Any = False) -> Any:
    """The ``score`` table (e.g. ``"snr"``) of the tensors of the κ ``table``, through
    :func:`kappatune.scan`'s pipeline and cache.

    Args:
        model (torch.nn.Module): the base model.
        table (KappaTable): its κ table (which tensors; the study's filters are already applied).
        score (str): a score of :data:`kappatune.table.SCORES`.
        cache (bool, path or KappaCache, optional): as :func:`kappatune.scan`. Default: ``False``.
    """
    from ..pipeline import model_refs, scan_refs

    want = set(table.names)
    refs = [r for r in model_refs(model) if r.name in want]
    out = scan_refs(refs, cache=cache, progress=False, score=score)
    lost = want - set(out.names)
    if lost:
        raise ArmError(f"the {score} scan does not cover {sorted(lost)[0]!r} (+{len(lost) - 1} more) of the κ table")
    return out


def select_tensors(arm: Arm, table: Any, budget: Mapping[str, Any], seed: int, ref: Sequence[str],
                   param_names: Optional[Sequence[str]] = None,
                   scores: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The tensors a selective arm trains on one seed.

    Args:
        arm (Arm): a selective arm.
        table (KappaTable): the base model's κ table.
        budget (mapping): the selection policy (``{"top_fraction": 0.1}``).
        seed (int): the seed (random arms draw from it).
        ref (sequence of str): κ-low's names at the budget (the reference count and kinds).
        param_names (sequence of str, optional): the model's parameter names (checks a ``names``
            arm). Default: ``None``.
        scores (mapping, optional): ``{score: table}`` of the same tensors for arms that rank by
            another score (:data:`SCORE_OF`, :func:`score_table`). Default: ``None``.

    Returns:
        dict: ``names``, ``rule``, ``params``, ``kinds``, ``kappa_range``.
    """
    if arm.kind == "names":
        names = list(arm.names or ())
        known = set(param_names) if param_names is not None else set(table.names)
        missing = [n for n in names if n not in known]
        if missing:
            raise ArmError(f"arm {arm.name}: {missing[0]!r} is not a parameter of the model"
                           + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        rule = "an explicit list of names"
    else:
        need = SCORE_OF.get(arm.kind)
        if need is not None and need not in (scores or {}):
            raise ArmError(f"arm {arm.name}: needs the {need} table of the model (selections() scans it)")
        names, rule = SELECTORS[arm.kind](table, budget, seed, ref, scores or {})
    if not names:
        raise ArmError(f"arm {arm.name}: selects no tensor at --budget {_fmt(budget)}; raise the budget")
    kap = [table[n].kappa for n in names if n in table]
    params = sum(table[n].numel for n in names if n in table)
    return {"names": names, "rule": rule, "params": params, "kinds": kinds_of(names),
            "kappa_range": [min(kap), max(kap)] if kap else None}


def lora_modules(model: Any, table: Any) -> List[Tuple[str, int, int]]:
    """``(module name, in, out)`` of every ``nn.Linear`` whose weight is in the κ table (LoRA's targets)."""
    import torch

    names = set(table.names)
    out = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names]
    if not out:
        raise ArmError(f"arm lora: no nn.Linear of {type(model).__name__} is in the κ table; LoRA has nothing to wrap")
    return out


def lora_rank_for(model: Any, table: Any, count: int) -> Tuple[int, int, List[str]]:
    r"""``(r, r · Σ(in + out), target kinds)``: the LoRA rank whose adapter size is closest to ``count``
    trainable parameters (at least 1)."""
    mods = lora_modules(model, table)
    per_rank = sum(i + o for _, i, o in mods)
    r = max(1, round(count / per_rank))
    return r, r * per_rank, sorted({n.split(".")[-1] for n, _, _ in mods})


def selections(cfg: StudyConfig, table: Any, model: Any, *, cache: Any = False,
               scores: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Every seed's tensors for every arm, LoRA's rank and the reference count (``selections.json``).

    Args:
        cfg (StudyConfig): the study.
        table (KappaTable): the base model's κ table.
        model (torch.nn.Module): the base model (parameter names, LoRA's modules).
        cache (bool, path or KappaCache, optional): the cache of the scans of other scores that arms
            need (:data:`SCORE_OF`; e.g. the SNR of a ``spectrum`` arm), as :func:`kappatune.scan`.
            Default: ``False``.
        scores (mapping, optional): ``{score: table}`` already computed (not scanned again).
            Default: ``None``.

    Raises:
        ArmError: an arm that selects nothing or names a tensor the model lacks.
    """
    budget = dict(cfg.budget)
    try:
        ref = list(table.select(**budget))
    except ValueError as e:
        raise ArmError(f"--budget {_fmt(budget)}: {e}") from None
    if not ref:
        raise ArmError(f"--budget {_fmt(budget)}: κ-low selects no tensor; raise the budget")
    ref_params = _params(table, ref)
    pnames = [n for n, _ in model.named_parameters()]
    all_params = sum(p.numel() for p in model.parameters())
    tables: Dict[str, Any] = dict(scores or {})
    for a in cfg.arms:  # each other score the arms rank by, scanned once for every seed
        need = SCORE_OF.get(a.kind)
        if need is not None and need not in tables:
            tables[need] = score_table(model, table, need, cache)
    per_seed: Dict[str, Dict[str, Any]] = {}
    for s in cfg.seeds:
        d: Dict[str, Any] = {}
        for a in cfg.arms:
            if a.selective:
                d[a.name] = select_tensors(a, table, budget, s, ref, pnames, tables)
            elif a.kind == "full":
                d[a.name] = {"names": None, "rule": "every parameter (embeddings, norms and LM head included)",
                             "params": all_params, "kinds": None, "kappa_range": None}
        per_seed[str(s)] = d
    out: Dict[str, Any] = {"budget": budget, "reference_names": ref, "reference_params": ref_params,
                           "table_params": table.total_numel, "model_params": all_params, "arms": per_seed,
                           "kappa": {e.name: e.kappa for e in table}}
    for name in sorted(set(SCORE_OF.get(a.kind) for a in cfg.arms) - {None}):  # e.g. "snr" with a spectrum arm
        out[name] = {e.name: (e.value if math.isfinite(e.value) else str(e.value)) for e in tables[name]}
    if any(a.kind == "lora" for a in cfg.arms):
        r, n, targets = lora_rank_for(model, table, ref_params)
        out["lora"] = {"r": r, "params": n, "targets": targets, "alpha": cfg.lora_alpha_over_r * r}
    out["fingerprint"] = hashlib.sha256(json.dumps(per_seed, sort_keys=True).encode()).hexdigest()[:12]
    return out
