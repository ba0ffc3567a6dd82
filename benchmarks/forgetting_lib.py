"""Machinery of the forgetting benchmark (``benchmarks/forgetting.py``).

Kept apart from the command line so the test can drive the same code with a tiny model built from
a config and synthetic token windows.

Pieces, one job each:

* :class:`BenchConfig` — every setting that changes a result (its :meth:`~BenchConfig.fingerprint`
  is stored in each run file; a run file written under other settings is refused, never mixed in).
* :class:`BenchData` — the fixed token windows: training batches (same order for every method), a
  small "curve" evaluation set (logged along training, used for the stop-at-target rule) and a
  larger "final" evaluation set, for the task (KJV) and the control corpus (Wikipedia).
* selection helpers — :func:`walk_budget` (the fits-in-budget rule of
  ``KappaTable.select(param_budget=...)`` on any order), :func:`kappa_high_names`,
  :func:`random_names`, :func:`lora_rank_for`.
* :func:`train_run` — one run: AdamW, constant LR, train until the held-out task loss reaches the
  target (or the step cap), then evaluate.
* :func:`plan` / :func:`run_benchmark` — which runs exist, in which order (full FT sets the target,
  the LR sweep on the first budget picks each method's LR), resumable per run.
* :func:`best_runs`, :func:`write_report`, :func:`write_plot` — aggregation (``--report``).
* :func:`probe_target`, :func:`run_lr_probe`, :func:`write_probe_report` — the LR probe
  (``--lr-probe``): extra (method, LR) runs at one budget against the main runs' target, kept in
  ``<out>/lr_probe/`` so the main runs, their plan and their report stay untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forgetting_v2 import synthetic_windows, tiny_llama  # noqa: E402  (one tiny model and Markov-chain generator for both studies)

METHODS = ("full", "kappa_low", "kappa_high", "random", "lora")
LABELS = {"full": "full FT", "kappa_low": "κ-low", "kappa_high": "κ-high", "random": "random", "lora": "LoRA"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# configuration
@dataclass
class BenchConfig:
    """Settings of one benchmark. Everything here changes results, so it is fingerprinted."""

    model: str = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
    task: str = "KJV verses"
    control: str = "Wikipedia summaries (all topics)"
    seq_len: int = 64
    batch: int = 4
    ft_steps: int = 15           # full FT trains exactly this long; its held-out task loss is the target
    cap_steps: int = 50          # step cap for every other run
    eval_every: int = 5          # curve evaluation (task + control) and target check period
    curve_windows: int = 8       # windows per corpus in the curve set
    final_windows: int = 32      # windows per corpus in the final set
    eval_batch: int = 16
    budgets: Tuple[float, ...] = (0.05, 0.15)   # fractions of the κ table's parameters (linear weights)
    random_seeds: Tuple[int, ...] = (0, 1, 2)
    lrs: Dict[str, Tuple[float, ...]] = field(default_factory=lambda: {
        "full": (3e-5, 1e-4),
        "kappa_low": (2e-4, 1e-3),
        "kappa_high": (2e-4, 1e-3),
        "random": (2e-4, 1e-3),
        "lora": (5e-4, 2e-3),
    })
    sweep_all_budgets: bool = False   # False: sweep LRs on budgets[0] only, reuse the best LR elsewhere
    separators: Tuple[str, str] = ("\n", "\n\n")   # between KJV verses / between Wikipedia summaries
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_alpha_over_r: float = 2.0
    match_tol: float = 0.05      # trainable-parameter match required against κ-low's actual count
    data_seed: int = 0

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        d["separators"] = list(self.separators)
        d["budgets"] = list(self.budgets)
        d["random_seeds"] = list(self.random_seeds)
        d["lrs"] = {k: list(v) for k, v in sorted(self.lrs.items())}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fingerprint"] = self.fingerprint()
        return d


def full_config() -> BenchConfig:
    return BenchConfig()


def quick_config() -> BenchConfig:
    """A few minutes on the real model: one budget, one LR per method, one random seed."""
    return BenchConfig(ft_steps=4, cap_steps=6, eval_every=3, curve_windows=4, final_windows=8,
                       budgets=(0.05,), random_seeds=(0,),
                       lrs={"full": (1e-4,), "kappa_low": (1e-3,), "kappa_high": (1e-3,),
                            "random": (1e-3,), "lora": (2e-3,)})


def tiny_config(quick: bool = True) -> BenchConfig:
    """For the tiny config-built model and synthetic windows (the harness test)."""
    cfg = BenchConfig(model="tiny LlamaForCausalLM from a config (random init)", task="synthetic Markov A",
                      control="synthetic Markov B", seq_len=32, batch=4, ft_steps=2, cap_steps=4,
                      eval_every=2, curve_windows=4, final_windows=8, eval_batch=8, budgets=(0.3, 0.5),
                      random_seeds=(0, 1),
                      lrs={"full": (1e-3,), "kappa_low": (3e-3,), "kappa_high": (3e-3,),
                           "random": (3e-3,), "lora": (3e-3,)})
    if not quick:
        cfg.lrs = {k: (v[0], 3 * v[0]) for k, v in cfg.lrs.items()}
    return cfg


# ----------------------------------------------------------------------------------------------
# data
@dataclass
class BenchData:
    """Fixed token windows; every method sees exactly these, training batches in this order."""

    train: torch.Tensor          # (>= cap_steps * batch, seq_len), task train split, seeded order
    task_curve: torch.Tensor     # task held-out, small set (curve + stop rule)
    control_curve: torch.Tensor  # control held-out, small set (curve)
    task_final: torch.Tensor     # task held-out, final set
    control_final: torch.Tensor  # control held-out, final set

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for t in (self.train, self.task_curve, self.control_curve, self.task_final, self.control_final):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def batch(self, step: int, size: int) -> torch.Tensor:
        return self.train[step * size:(step + 1) * size]


def _sample(windows: torch.Tensor, n: int, seed: int, what: str) -> torch.Tensor:
    if len(windows) < n:
        raise ValueError(f"{what}: only {len(windows)} token windows available, need {n}; "
                         "lower the window count or the sequence length")
    g = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(len(windows), generator=g)[:n]].clone()


def make_data(task_train: torch.Tensor, task_held: torch.Tensor, control_held: torch.Tensor,
              cfg: BenchConfig) -> BenchData:
    """Draw the fixed windows from tokenized corpora (``(N, seq_len)`` each), seeded by ``cfg.data_seed``.

    Curve sets are the first windows of the final sets, so both measure the same held-out text.
    """
    for t, what in ((task_train, "task train"), (task_held, "task held-out"), (control_held, "control held-out")):
        if t.dim() != 2 or t.shape[1] != cfg.seq_len:
            raise ValueError(f"{what} windows must be (N, seq_len={cfg.seq_len}), got {tuple(t.shape)}")
    s = cfg.data_seed
    train = _sample(task_train, cfg.cap_steps * cfg.batch, s, "task train")
    n_eval = max(cfg.final_windows, cfg.curve_windows)
    tf = _sample(task_held, n_eval, s + 1, "task held-out")
    cf = _sample(control_held, n_eval, s + 2, "control held-out")
    return BenchData(train=train, task_curve=tf[:cfg.curve_windows], control_curve=cf[:cfg.curve_windows],
                     task_final=tf[:cfg.final_windows], control_final=cf[:cfg.final_windows])


def text_windows(tokenizer, texts: Sequence[str], seq_len: int, sep: str, chunk: int = 512) -> torch.Tensor:
    """Join ``texts`` with ``sep`` (plain text, no special tokens), tokenize, cut into ``(N, seq_len)``.

    Unlike ``examples/offline.token_windows`` (EOS between documents) this puts no chat token
    into the text: SmolLM2-135M-*Instruct*'s EOS is ``<|im_end|>``, and with one after every KJV
    verse (~30 tokens) the first training steps mostly learn that separator (see the README section).
    """
    ids: List[int] = []
    for i in range(0, len(texts), chunk):
        ids.extend(tokenizer(sep.join(texts[i:i + chunk]) + sep, add_special_tokens=False)["input_ids"])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def real_data(tokenizer, cfg: BenchConfig) -> BenchData:
    """KJV (task, 10% of verses held out) and Wikipedia summaries (control, 10% held out), seeded."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import offline

    kjv_train, kjv_held = offline.split(offline.kjv_verses(), held_out=0.1, seed=cfg.data_seed)
    _, wiki_held = offline.split(offline.wiki_summaries(), held_out=0.1, seed=cfg.data_seed)
    # contiguous text, cut into windows, then a seeded sample of windows from the whole corpus
    tsep, csep = cfg.separators
    tt = text_windows(tokenizer, kjv_train, cfg.seq_len, tsep)
    th = text_windows(tokenizer, kjv_held, cfg.seq_len, tsep)
    ch = text_windows(tokenizer, wiki_held, cfg.seq_len, csep)
    return make_data(tt, th, ch, cfg)


def tiny_model_and_data(cfg: BenchConfig, layers: int = 4, hidden: int = 64, vocab: int = 128):
    """A random-init LlamaForCausalLM from a config plus synthetic task/control windows."""
    model = tiny_llama(cfg.seq_len, layers, hidden, vocab)
    n = cfg.cap_steps * cfg.batch + 2 * max(cfg.final_windows, cfg.curve_windows)
    task = synthetic_windows(vocab, n, cfg.seq_len, seed=1)
    control = synthetic_windows(vocab, 2 * cfg.final_windows, cfg.seq_len, seed=2)
    ntr = cfg.cap_steps * cfg.batch
    return model, make_data(task[:ntr], task[ntr:], control, cfg)


# ----------------------------------------------------------------------------------------------
# selection at an equal parameter budget
def budget_count(table, budget: float) -> float:
    """The budget in parameters, as ``KappaTable.select(param_budget=budget)`` reads it."""
    if isinstance(budget, float) and budget <= 1:
        return budget * table.total_numel
    return float(budget)


def walk_budget(order: Sequence[str], numel: Dict[str, int], budget: float) -> List[str]:
    """Walk ``order`` and keep every tensor that still fits in ``budget`` parameters.

    The same rule as ``KappaTable.select(param_budget=...)``: a tensor that does not fit is
    skipped and the walk goes on, so smaller tensors later in the order can still fill the budget.
    """
    out, used = [], 0
    for n in order:
        if used + numel[n] <= budget:
            out.append(n)
            used += numel[n]
    return out


def kappa_low_names(table, budget: float) -> List[str]:
    return table.select(param_budget=budget)


def kappa_high_names(table, budget: float) -> List[str]:
    """The reverse ablation: walk from the highest κ down with the same fits-in-budget rule."""
    numel = {e.name: e.numel for e in table}
    return walk_budget(list(reversed(table.names)), numel, budget_count(table, budget))


def random_names(table, budget: float, seed: int) -> List[str]:
    """A seeded random order of the κ table's tensors, same fits-in-budget rule."""
    names = list(table.names)
    random.Random(seed).shuffle(names)
    numel = {e.name: e.numel for e in table}
    return walk_budget(names, numel, budget_count(table, budget))


def lora_targets(model, targets: Sequence[str] = LORA_TARGETS) -> List[Tuple[str, int, int]]:
    """(module name, in_features, out_features) of every ``nn.Linear`` LoRA would wrap."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
            out.append((name, mod.in_features, mod.out_features))
    if not out:
        raise ValueError(f"no nn.Linear named one of {list(targets)} in {type(model).__name__}")
    return out


def lora_rank_for(model, count: int, targets: Sequence[str] = LORA_TARGETS) -> Tuple[int, int]:
    """The LoRA rank ``r`` whose adapter size ``r · Σ(in + out)`` is closest to ``count``.

    Returns ``(r, r · Σ(in + out))``.
    """
    per_rank = sum(i + o for _, i, o in lora_targets(model, targets))
    r = max(1, round(count / per_rank))
    return r, r * per_rank


def check_match(method: str, actual: int, reference: int, tol: float) -> None:
    dev = actual / reference - 1
    if abs(dev) > tol:
        raise ValueError(f"{method}: {actual:,} trainable parameters vs κ-low's {reference:,} "
                         f"({dev:+.1%}) is outside the ±{tol:.0%} match; pick other budgets")


# ----------------------------------------------------------------------------------------------
# runs
@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    budget: Optional[float] = None   # None for full FT
    seed: int = 0                    # random selection seed (0 for the others)
    phase: str = "sweep"             # "target" (full FT), "sweep", "reuse"

    @property
    def run_id(self) -> str:
        b = "" if self.budget is None else f"_b{self.budget:g}"
        s = f"_s{self.seed}" if self.method == "random" else ""
        return f"{self.method}{b}{s}_lr{self.lr:g}"


def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy over ``windows`` (batched, under ``torch.inference_mode``)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            x = windows[i:i + batch]
            logits = model(input_ids=x, use_cache=False).logits
            tot += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                   reduction="sum").item()
            n += x[:, 1:].numel()
    model.train(was)
    return tot / n


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def have_kappatune_optimizer() -> bool:
    import kappatune

    return hasattr(kappatune, "KappaTuneOptimizer")


def build(base_model, spec: RunSpec, table, cfg: BenchConfig, ref_count: Optional[int], impl: str = "auto"):
    """A fresh copy of the model, its optimizer and the selection for ``spec``.

    Selection methods share one code path: ``kappatune.KappaTuneOptimizer`` (``impl="optimizer"``;
    κ-low through ``param_budget=`` + ``table=``, κ-high/random through ``names=``) or, where it is
    not available, ``kappatune.freeze_all_but`` + ``torch.optim.AdamW`` (``impl="freeze"``);
    ``"auto"`` picks the optimizer when kappatune has it.
    Returns ``(model, optimizer, params, trainable_count, info)``; ``info`` records the selection.
    """
    if impl not in ("auto", "optimizer", "freeze"):
        raise ValueError(f"impl must be 'auto', 'optimizer' or 'freeze', got {impl!r}")
    import kappatune

    model = copy.deepcopy(base_model)
    model.train()
    info: Dict[str, Any] = {}
    adamw = dict(lr=spec.lr, weight_decay=cfg.weight_decay)
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, **adamw)
        info["optimizer_impl"] = "torch.optim.AdamW(model.parameters())"
    elif spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        r, expect = lora_rank_for(model, ref_count)
        lcfg = LoraConfig(r=r, lora_alpha=cfg.lora_alpha_over_r * r, lora_dropout=0.0, bias="none",
                          target_modules=list(LORA_TARGETS))
        model = get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        if n != expect:
            raise RuntimeError(f"LoRA r={r}: peft made {n:,} trainable parameters, expected {expect:,}")
        opt = torch.optim.AdamW(params, **adamw)
        info.update(lora_rank=r, lora_alpha=cfg.lora_alpha_over_r * r, lora_targets=list(LORA_TARGETS),
                    optimizer_impl="peft LoRA + torch.optim.AdamW")
    else:
        if spec.method == "kappa_low":
            names = kappa_low_names(table, spec.budget)
        elif spec.method == "kappa_high":
            names = kappa_high_names(table, spec.budget)
        elif spec.method == "random":
            names = random_names(table, spec.budget, spec.seed)
        else:
            raise ValueError(f"unknown method {spec.method!r}; choose from {METHODS}")
        use_opt = have_kappatune_optimizer() if impl == "auto" else impl == "optimizer"
        if use_opt:
            if spec.method == "kappa_low":   # kappatune's own selection path
                opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, param_budget=spec.budget,
                                                   table=table, progress=False, **adamw)
                got = list(getattr(opt, "selected", names))
                if sorted(got) != sorted(names):
                    raise RuntimeError("KappaTuneOptimizer(param_budget=...) selected other tensors than "
                                       "table.select(param_budget=...)")
                info["optimizer_impl"] = "kappatune.KappaTuneOptimizer(AdamW, param_budget=, table=)"
            else:
                opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, names=names, table=table,
                                                   progress=False, **adamw)
                info["optimizer_impl"] = "kappatune.KappaTuneOptimizer(AdamW, names=, table=)"
        else:
            kappatune.freeze_all_but(model, names)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
            info["optimizer_impl"] = "kappatune.freeze_all_but + torch.optim.AdamW"
        params = [p for p in model.parameters() if p.requires_grad]
        info["selected"] = names
        info["selected_kinds"] = _count_kinds(names)
        info["kappa_range"] = [min(table[n].kappa for n in names), max(table[n].kappa for n in names)]
    trainable = sum(p.numel() for p in params)
    if spec.method != "full" and ref_count is not None:
        check_match(spec.run_id, trainable, ref_count, cfg.match_tol)
    return model, opt, params, trainable, info


def _count_kinds(names: Iterable[str]) -> Dict[str, int]:
    from kappatune.selection import module_kind

    out: Dict[str, int] = {}
    for n in names:
        out[module_kind(n)] = out.get(module_kind(n), 0) + 1
    return dict(sorted(out.items()))


def train_run(base_model, spec: RunSpec, table, data: BenchData, cfg: BenchConfig, base: Dict[str, float],
              target: Optional[float], ref_count: Optional[int], progress: bool = True,
              impl: str = "auto") -> Dict[str, Any]:
    """One run; returns its result record (see the module docstring)."""
    t0 = time.perf_counter()
    torch.manual_seed(1000 + spec.seed)
    model, opt, params, trainable, info = build(base_model, spec, table, cfg, ref_count, impl)
    setup_s = time.perf_counter() - t0
    steps = cfg.ft_steps if spec.method == "full" else cfg.cap_steps
    curve = [{"step": 0, "task_loss": base["task_curve"], "control_loss": base["control_curve"]}]
    reached_at: Optional[int] = None
    train_losses: List[float] = []
    bar = _bar(steps, spec.run_id, progress)
    train_s = eval_s = 0.0
    step = 0
    diverged = False
    for step in range(1, steps + 1):
        ts = time.perf_counter()
        x = data.batch(step - 1, cfg.batch)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - ts
        lv = float(loss.detach())
        train_losses.append(lv)
        if not math.isfinite(lv):
            diverged = True
        if step % cfg.eval_every == 0 or step == steps or diverged:
            te = time.perf_counter()
            tl = evaluate(model, data.task_curve, cfg.eval_batch)
            cl = evaluate(model, data.control_curve, cfg.eval_batch)
            eval_s += time.perf_counter() - te
            curve.append({"step": step, "task_loss": tl, "control_loss": cl})
            if bar is not None:
                bar.set_postfix(task=f"{tl:.3f}", ctrl=f"{cl:.3f}",
                                target="-" if target is None else f"{target:.3f}")
            if target is not None and spec.method != "full" and tl <= target:
                reached_at = step
        if bar is not None:
            bar.update(1)
        if reached_at is not None or diverged:
            break
    if bar is not None:
        bar.close()
    te = time.perf_counter()
    task_final = evaluate(model, data.task_final, cfg.eval_batch)
    control_final = evaluate(model, data.control_final, cfg.eval_batch)
    final_eval_s = time.perf_counter() - te
    if spec.method == "full":
        reached_at = step
    wall = time.perf_counter() - t0
    return {
        "run_id": spec.run_id, "method": spec.method, "budget": spec.budget, "seed": spec.seed, "lr": spec.lr,
        "phase": spec.phase, "trainable_params": trainable, "reference_params": ref_count,
        "linear_params": table.total_numel, "target_task_loss": target,
        "steps": step, "steps_to_target": reached_at, "reached_target": reached_at is not None,
        "diverged": diverged, "train_losses": train_losses, "curve": curve,
        "task_loss": task_final, "task_ppl": _ppl(task_final),
        "control_loss": control_final, "control_ppl": _ppl(control_final),
        "base_task_loss": base["task_final"], "base_control_loss": base["control_final"],
        "forgetting": _ppl(control_final) / _ppl(base["control_final"]),
        "wall_s": wall, "setup_s": setup_s, "train_s": train_s, "eval_s": eval_s, "final_eval_s": final_eval_s,
        "s_per_step": train_s / max(1, step), "threads": torch.get_num_threads(), **info,
        "config_fingerprint": cfg.fingerprint(), "data_fingerprint": data.fingerprint(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", leave=True, mininterval=0.5 if tty else 20.0,
                dynamic_ncols=tty)


# ----------------------------------------------------------------------------------------------
# bookkeeping: run files, plan, selection of the best LR
def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def load_runs(out: Path, cfg: Optional[BenchConfig] = None) -> Dict[str, Dict[str, Any]]:
    """Finished runs in ``out/runs``; with ``cfg``, refuse files written under other settings."""
    runs: Dict[str, Dict[str, Any]] = {}
    d = out / "runs"
    if not d.is_dir():
        return runs
    for p in sorted(d.glob("*.json")):
        r = json.loads(p.read_text(encoding="utf-8"))
        if cfg is not None and r.get("config_fingerprint") != cfg.fingerprint():
            raise ValueError(f"{p} was written under other benchmark settings (fingerprint "
                             f"{r.get('config_fingerprint')} != {cfg.fingerprint()}); use another --out "
                             "folder or delete the old runs")
        runs[r["run_id"]] = r
    return runs


def best_of(runs: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The rule for every method: lowest forgetting among runs that reached the target, else the
    lowest final task loss. Diverged runs are never best unless nothing else exists."""
    if not runs:
        return None
    ok = [r for r in runs if not r.get("diverged")] or list(runs)
    reached = [r for r in ok if r["reached_target"]]
    if reached:
        return min(reached, key=lambda r: (r["forgetting"], r["task_loss"]))
    return min(ok, key=lambda r: r["task_loss"])


def target_from(full_runs: Sequence[Dict[str, Any]]) -> Optional[float]:
    """The target: the lowest held-out (curve) task loss any full-FT LR reaches after ``ft_steps``."""
    if not full_runs:
        return None
    return min(r["curve"][-1]["task_loss"] for r in full_runs if not r.get("diverged")) \
        if any(not r.get("diverged") for r in full_runs) else None


def plan(cfg: BenchConfig, done: Dict[str, Dict[str, Any]],
         only: Optional[Sequence[str]] = None) -> Tuple[List[RunSpec], List[str]]:
    """``(ready, blocked)``: runs that can start now (not yet done), and descriptions of runs waiting
    for a dependency (the target needs full FT; reuse runs need their method's LR sweep)."""
    methods = [m for m in METHODS if only is None or m in only or (m == "full")]
    ready: List[RunSpec] = []
    blocked: List[str] = []
    full_specs = [RunSpec("full", lr, None, 0, "target") for lr in cfg.lrs["full"]]
    ready += [s for s in full_specs if s.run_id not in done]
    have_target = all(s.run_id in done for s in full_specs)
    sweep_budgets = cfg.budgets if cfg.sweep_all_budgets else cfg.budgets[:1]
    for m in methods:
        if m == "full":
            continue
        if only is not None and m not in only:
            continue
        for b in cfg.budgets:
            if b in sweep_budgets:
                sweep = [RunSpec(m, lr, b, 0, "sweep") for lr in cfg.lrs[m]]
                src_budget = b
            else:
                sweep = []
                src_budget = cfg.budgets[0]
            if not have_target:
                blocked += [f"{m} b={b:g} (waits for the full-FT target)"]
                continue
            todo = [s for s in sweep if s.run_id not in done]
            ready += todo
            src = [done.get(RunSpec(m, lr, src_budget, 0).run_id) for lr in cfg.lrs[m]]
            seeds = cfg.random_seeds if m == "random" else (0,)
            reuse_seeds = [s for s in seeds if not (b in sweep_budgets and s == 0)]
            if not reuse_seeds:
                continue
            if any(r is None for r in src):
                blocked += [f"{m} b={b:g} seeds={list(reuse_seeds)} (waits for the LR sweep at b={src_budget:g})"]
                continue
            lr = best_of(src)["lr"]
            ready += [s for s in (RunSpec(m, lr, b, sd, "reuse") for sd in reuse_seeds) if s.run_id not in done]
    return ready, blocked


def reference_count(table, budget: float) -> int:
    return sum(table[n].numel for n in kappa_low_names(table, budget))


def compute_base(model, data: BenchData, cfg: BenchConfig, out: Path) -> Dict[str, float]:
    """Losses of the untouched model on the four evaluation sets, cached in ``out/base.json``."""
    p = out / "base.json"
    fp = data.fingerprint()
    if p.exists():
        b = json.loads(p.read_text(encoding="utf-8"))
        if b.get("data_fingerprint") == fp and b.get("config_fingerprint") == cfg.fingerprint():
            return b
    t = time.perf_counter()
    b = {"task_curve": evaluate(model, data.task_curve, cfg.eval_batch),
         "control_curve": evaluate(model, data.control_curve, cfg.eval_batch),
         "task_final": evaluate(model, data.task_final, cfg.eval_batch),
         "control_final": evaluate(model, data.control_final, cfg.eval_batch)}
    b.update(eval_s=time.perf_counter() - t, data_fingerprint=fp, config_fingerprint=cfg.fingerprint())
    atomic_write_json(p, b)
    return b


def print_selection_check(table, cfg: BenchConfig, model, log: Callable[[str], None] = print) -> None:
    """Actual trainable counts of every selection method at every budget, against κ-low's."""
    for b in cfg.budgets:
        ref = reference_count(table, b)
        log(f"budget {b:g} (≤ {budget_count(table, b):,.0f} params): κ-low {ref:,} ({ref / table.total_numel:.2%} "
            "of the linear weights)")
        rows = [("kappa_high", kappa_high_names(table, b))] + \
               [(f"random s{s}", random_names(table, b, s)) for s in cfg.random_seeds]
        for label, names in rows:
            n = sum(table[x].numel for x in names)
            check_match(f"{label} b={b:g}", n, ref, cfg.match_tol)
            log(f"    {label:<11} {n:>12,}  ({n / ref - 1:+.2%}, {len(names)} tensors)")
        r, n = lora_rank_for(model, ref)
        check_match(f"lora b={b:g}", n, ref, cfg.match_tol)
        log(f"    {'lora r=' + str(r):<11} {n:>12,}  ({n / ref - 1:+.2%})")


def run_benchmark(base_model, table, data: BenchData, cfg: BenchConfig, out: Path,
                  only: Optional[Sequence[str]] = None, progress: bool = True,
                  log: Callable[[str], None] = print, max_runs: Optional[int] = None,
                  threads_fn: Optional[Callable[[], int]] = None) -> Dict[str, Dict[str, Any]]:
    """Run every planned run not yet in ``out/runs`` (each saved as it finishes); return all runs.

    Order: the full-FT runs (they set the target), then every run of the first budget (LR sweeps,
    then the other random seeds), then the other budgets. ``threads_fn`` picks the torch thread
    count before each run."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if only is not None:
        bad = [m for m in only if m not in METHODS]
        if bad:
            raise ValueError(f"--only: unknown method(s) {bad}; choose from {list(METHODS)}")
    atomic_write_json(out / "config.json", cfg.to_dict())
    for p in base_model.parameters():
        p.requires_grad_(False)
    base = compute_base(base_model, data, cfg, out)
    log(f"before training: task loss {base['task_final']:.4f} (PPL {_ppl(base['task_final']):.2f}), "
        f"control loss {base['control_final']:.4f} (PPL {_ppl(base['control_final']):.2f})")
    print_selection_check(table, cfg, base_model, log)
    done = load_runs(out, cfg)
    n_run = 0
    while True:
        ready, blocked = plan(cfg, done, only)
        if not ready:
            break
        if max_runs is not None and n_run >= max_runs:
            break
        order = {b: i for i, b in enumerate(cfg.budgets)}
        spec = min(ready, key=lambda sp: -1 if sp.budget is None else order[sp.budget])  # stable: first budget first
        if threads_fn is not None:
            torch.set_num_threads(threads_fn())
        full = [done[rid] for rid in (RunSpec("full", lr).run_id for lr in cfg.lrs["full"]) if rid in done]
        target = target_from(full) if spec.method != "full" else None
        ref = reference_count(table, spec.budget) if spec.budget is not None else None
        log(f"[run {len(done) + 1}; {len(ready)} ready, {len(blocked)} group(s) waiting] {spec.run_id} ({spec.phase}, "
            f"{torch.get_num_threads()} threads)"
            + ("" if target is None else f", target task loss {target:.4f}"))
        rec = train_run(base_model, spec, table, data, cfg, base, target, ref, progress)
        atomic_write_json(out / "runs" / f"{spec.run_id}.json", rec)
        done[spec.run_id] = rec
        n_run += 1
        st = (f"reached at step {rec['steps_to_target']}" if rec["reached_target"] and spec.method != "full"
              else f"{rec['steps']} steps" + ("" if spec.method == "full" else " (target not reached)"))
        log(f"    {spec.run_id}: {rec['trainable_params']:,} trainable, {st}, task PPL {rec['task_ppl']:.2f}, "
            f"control PPL {rec['control_ppl']:.2f}, forgetting ×{rec['forgetting']:.4f}, "
            f"{rec['wall_s']:.0f} s ({rec['s_per_step']:.2f} s/step)")
    return done


# ----------------------------------------------------------------------------------------------
# report
def best_runs(cfg: BenchConfig, runs: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of the main table: per method and budget, the best LR (random: every seed at the
    LR chosen on seed 0). Full FT appears once (budget ``None``)."""
    rows = []
    full = [runs[s.run_id] for s in (RunSpec("full", lr) for lr in cfg.lrs["full"]) if s.run_id in runs]
    if full:
        rows.append(min(full, key=lambda r: r["task_loss"]))
    for b in cfg.budgets:
        for m in METHODS[1:]:
            if b in (cfg.budgets if cfg.sweep_all_budgets else cfg.budgets[:1]):
                sweep = [runs.get(RunSpec(m, lr, b).run_id) for lr in cfg.lrs[m]]
                sweep = [r for r in sweep if r is not None]
                best = best_of(sweep)
                lr = None if best is None else best["lr"]
            else:
                src = [runs.get(RunSpec(m, lr, cfg.budgets[0]).run_id) for lr in cfg.lrs[m]]
                lr = best_of([r for r in src if r is not None])["lr"] if all(r is not None for r in src) else None
            if lr is None:
                continue
            seeds = cfg.random_seeds if m == "random" else (0,)
            for s in seeds:
                r = runs.get(RunSpec(m, lr, b, s).run_id)
                if r is not None:
                    rows.append(r)
    return rows


def _fmt_params(n: int, total: int) -> str:
    return f"{n / 1e6:.2f}M ({n / total:.1%})"


def _steps(r: Dict[str, Any], cfg: BenchConfig) -> str:
    if r["method"] == "full":
        return f"{r['steps']} (sets target)"
    if r.get("diverged"):
        return f"diverged at {r['steps']}"
    return str(r["steps_to_target"]) if r["reached_target"] else f"not reached (cap {cfg.cap_steps})"


def _stats(xs: Sequence[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f} (min {min(xs):.4f}, max {max(xs):.4f})"


def headline(cfg: BenchConfig, rows: List[Dict[str, Any]]) -> List[str]:
    """One line per budget comparing κ-low's forgetting to random and κ-high (numbers only)."""
    out = []
    for b in cfg.budgets:
        at = [r for r in rows if r["budget"] == b]
        lo = [r for r in at if r["method"] == "kappa_low"]
        hi = [r for r in at if r["method"] == "kappa_high"]
        rnd = [r for r in at if r["method"] == "random"]
        lora = [r for r in at if r["method"] == "lora"]
        if not lo:
            out.append(f"- budget {b:g}: κ-low not finished yet.")
            continue
        L = lo[0]
        parts = [f"κ-low forgetting ×{L['forgetting']:.4f} (task PPL {L['task_ppl']:.2f}"
                 + ("" if L["reached_target"] else ", target not reached") + ")"]
        if rnd:
            f = [r["forgetting"] for r in rnd]
            n_reach = sum(r["reached_target"] for r in rnd)
            parts.append(f"random ×{_stats(f)} over {len(f)} seed(s), {n_reach}/{len(f)} reached the target")
            if len(f) > 1:
                sd = statistics.stdev(f)
                z = (L["forgetting"] - statistics.mean(f)) / sd if sd > 0 else float("nan")
                parts.append(f"κ-low − random mean = {L['forgetting'] - statistics.mean(f):+.4f} "
                             f"({z:+.1f} random-seed SDs)")
        if hi:
            H = hi[0]
            parts.append(f"κ-high ×{H['forgetting']:.4f}" + ("" if H["reached_target"] else " (target not reached)"))
        if lora:
            parts.append(f"LoRA ×{lora[0]['forgetting']:.4f}" + ("" if lora[0]["reached_target"] else
                                                                  " (target not reached)"))
        out.append(f"- budget {b:g}: " + "; ".join(parts) + ".")
    return out


def _read_base(out: Path) -> Optional[Dict[str, Any]]:
    """The untrained model's losses saved by :func:`compute_base` in ``out/base.json``, if any."""
    p = Path(out) / "base.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def write_report(cfg: BenchConfig, out: Path, command: str = "", only_finished_note: bool = True) -> str:
    """``out/results.md`` from the run files in ``out/runs`` (no model needed)."""
    out = Path(out)
    runs = load_runs(out, cfg)
    base = _read_base(out)
    rows = best_runs(cfg, runs)
    ready, blocked = plan(cfg, runs)
    lines = ["# Forgetting benchmark: κ-selection vs random, κ-high, LoRA and full FT", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Model: {cfg.model}. Task: continued pre-training (causal LM loss) on {cfg.task}; "
              f"control: {cfg.control}. Sequence length {cfg.seq_len}, batch {cfg.batch} windows, AdamW "
              f"(weight decay {cfg.weight_decay:g}, constant LR, grad-norm clip {cfg.grad_clip:g}). "
              f"Full FT trains {cfg.ft_steps} steps; its lowest held-out task loss sets the target; every other "
              f"run trains until its held-out task loss (checked every {cfg.eval_every} steps on "
              f"{cfg.curve_windows} windows) reaches it, at most {cfg.cap_steps} steps. Final numbers on "
              f"{cfg.final_windows} held-out windows per corpus. Forgetting = control PPL after / before.", ""]
    if base:
        lines += [f"Before training: task PPL {_ppl(base['task_final']):.2f} (loss {base['task_final']:.4f}), "
                  f"control PPL {_ppl(base['control_final']):.2f} (loss {base['control_final']:.4f}).", ""]
    full = [r for r in runs.values() if r["method"] == "full"]
    tgt = target_from(full)
    if tgt is not None:
        lines += [f"Target held-out task loss: {tgt:.4f} (PPL {_ppl(tgt):.2f}, curve set).", ""]
    total = next(iter(runs.values()))["linear_params"] if runs else 0
    lines += ["## Best run per method (LR chosen by: lowest forgetting among runs that reached the target, "
              "else lowest task loss)", "",
              "| method | budget | LR | trainable params (% of linear) | steps to target | task PPL | control PPL "
              "| forgetting | wall time |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = LABELS[r["method"]] + (f" (seed {r['seed']})" if r["method"] == "random" else "") + \
            (f" r={r['lora_rank']}" if r["method"] == "lora" else "")
        budget = "—" if r["budget"] is None else f"{r['budget']:g}"
        params = (f"{r['trainable_params'] / 1e6:.2f}M (all)" if r["method"] == "full"
                  else _fmt_params(r["trainable_params"], total))
        lines.append(f"| {name} | {budget} | {r['lr']:g} | "
                     f"{params} | {_steps(r, cfg)} | {r['task_ppl']:.2f} | "
                     f"{r['control_ppl']:.3f} | ×{r['forgetting']:.4f} | {r['wall_s']:.0f} s |")
    lines += ["", "## Headline (computed)", ""] + headline(cfg, rows)
    lines += ["", "## Every run (LR sweep included)", "",
              "| run | phase | trainable | steps | reached | task PPL | control PPL | forgetting | s/step | wall |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for rid in sorted(runs):
        r = runs[rid]
        lines.append(f"| {rid} | {r['phase']} | {r['trainable_params']:,} | {r['steps']} | "
                     f"{'yes' if r['reached_target'] else 'no'}{' (diverged)' if r.get('diverged') else ''} | "
                     f"{r['task_ppl']:.2f} | {r['control_ppl']:.3f} | ×{r['forgetting']:.4f} | "
                     f"{r['s_per_step']:.2f} | {r['wall_s']:.0f} s |")
    if ready or blocked:
        lines += ["", f"## NOT FINISHED: {len(ready)} run(s) ready, {len(blocked)} group(s) waiting", ""]
        order = {b: i for i, b in enumerate(cfg.budgets)}
        ready = sorted(ready, key=lambda sp: -1 if sp.budget is None else order[sp.budget])
        lines += [f"- ready: {s.run_id}" for s in ready] + [f"- waiting: {b}" for b in blocked]
        lines += ["", "Resume with the same command (finished runs are kept, not redone)."]
    else:
        lines += ["", f"All {len(runs)} planned runs finished."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    atomic_write_json(out / "summary.json", {"config": cfg.to_dict(), "target": tgt, "base": base,
                                             "best": [{k: v for k, v in r.items() if k not in
                                                       ("train_losses", "selected")} for r in rows],
                                             "headline": headline(cfg, rows),
                                             "unfinished": [s.run_id for s in ready] + blocked})
    return text


def write_plot(cfg: BenchConfig, out: Path) -> Optional[Path]:
    """``out/tradeoff.png``: control PPL against task PPL along training, one line per method,
    one panel per budget (full FT in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    runs = load_runs(out, cfg)
    rows = best_runs(cfg, runs)
    if not rows:
        return None
    colors = {"full": "black", "kappa_low": "tab:blue", "kappa_high": "tab:red", "random": "tab:gray",
              "lora": "tab:green"}
    fig, axes = plt.subplots(1, len(cfg.budgets), figsize=(7.0 * len(cfg.budgets), 5.0), squeeze=False)
    tgt = target_from([r for r in runs.values() if r["method"] == "full"])
    for ax, b in zip(axes[0], cfg.budgets):
        seen = set()
        for r in rows:
            if r["budget"] not in (None, b):
                continue
            xs = [_ppl(c["task_loss"]) for c in r["curve"]]
            ys = [_ppl(c["control_loss"]) for c in r["curve"]]
            n_seeds = len(cfg.random_seeds)
            lab = (f"random ({n_seeds} seed{'s' if n_seeds > 1 else ''})" if r["method"] == "random"
                   else LABELS[r["method"]])
            ax.plot(xs, ys, "-o", ms=2.5, lw=1.0 if r["method"] == "random" else 1.8, color=colors[r["method"]],
                    alpha=0.7 if r["method"] == "random" else 1.0,
                    label=None if r["method"] in seen else f"{lab}, lr {r['lr']:g}")
            ax.plot(xs[-1:], ys[-1:], "s", ms=5, color=colors[r["method"]])
            seen.add(r["method"])
        if tgt is not None:
            ax.axvline(_ppl(tgt), color="k", ls=":", lw=0.8, label="target task PPL")
        ax.invert_xaxis()
        ax.set_xlabel(f"held-out task PPL ({cfg.task.split(' (')[0]}); training moves left → right")
        ax.set_ylabel(f"held-out control PPL ({cfg.control.split(' (')[0]})")
        ax.set_title(f"budget {b:g} of the linear weights", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Forgetting–adaptation trade-off, {cfg.model.split(' (')[0]}: up = forgetting, right = more "
                 f"adapted\n(best LR per method; points every {cfg.eval_every} steps on the curve set; "
                 "square = end of run)", fontsize=9)
    fig.tight_layout()
    p = out / "tradeoff.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


# ----------------------------------------------------------------------------------------------
# LR probe: extra learning rates for some methods at one budget, against the main target
PROBE_DIR = "lr_probe"


def probe_specs(lrs: Sequence[float], methods: Sequence[str], budget: float, seed: int = 0) -> List[RunSpec]:
    """One :class:`RunSpec` per (method, LR), in the order given; ``seed`` is the random selection's."""
    if not lrs:
        raise ValueError("--lr-probe: give at least one learning rate")
    bad = [lr for lr in lrs if not (lr > 0 and math.isfinite(lr))]
    if bad:
        raise ValueError(f"--lr-probe: learning rates must be positive and finite, got {bad}")
    bad_m = [m for m in methods if m not in METHODS[1:]]
    if bad_m or not methods:
        raise ValueError(f"--probe-methods: unknown or empty {bad_m or list(methods)}; choose from {list(METHODS[1:])}")
    if not budget > 0:
        raise ValueError(f"--probe-budget must be > 0 (a fraction <= 1 or a parameter count), got {budget}")
    return [RunSpec(m, float(lr), budget, seed if m == "random" else 0, "lr_probe")
            for m in dict.fromkeys(methods) for lr in dict.fromkeys(lrs)]


def probe_target(cfg: BenchConfig, out: Path) -> Tuple[float, Dict[str, Dict[str, Any]]]:
    """``(target, main runs)``: the target of the main table, from the full-FT runs in ``out/runs``.

    Raises ``ValueError`` when any full-FT run of ``cfg`` is missing there (the probe never runs
    them itself: its target must be the main table's)."""
    out = Path(out)
    main = load_runs(out, cfg)
    need = [RunSpec("full", lr).run_id for lr in cfg.lrs["full"]]
    missing = [rid for rid in need if rid not in main]
    if missing:
        raise ValueError(f"--lr-probe needs the main benchmark's full-FT runs {missing} in {out / 'runs'} (they set "
                         "the target); run the main benchmark first (e.g. with --only kappa_low), or point --out "
                         "at its results folder")
    target = target_from([main[rid] for rid in need])
    if target is None:
        raise ValueError(f"every full-FT run in {out / 'runs'} diverged; there is no target for the LR probe")
    return target, main


def run_lr_probe(base_model, table, data: BenchData, cfg: BenchConfig, out: Path, specs: Sequence[RunSpec],
                 progress: bool = True, log: Callable[[str], None] = print,
                 threads_fn: Optional[Callable[[], int]] = None) -> Dict[str, Dict[str, Any]]:
    """Run every probe spec not yet in ``out/lr_probe/runs`` with :func:`train_run` (the main runs'
    code, data, base losses and target); save each as it finishes; return all probe runs."""
    out = Path(out)
    target, _ = probe_target(cfg, out)
    pdir = out / PROBE_DIR
    (pdir / "runs").mkdir(parents=True, exist_ok=True)
    for p in base_model.parameters():
        p.requires_grad_(False)
    base = compute_base(base_model, data, cfg, out)
    done = load_runs(pdir, cfg)
    todo = [s for s in specs if s.run_id not in done]
    log(f"LR probe: {len(specs) - len(todo)} of {len(specs)} run(s) already in {pdir / 'runs'}; "
        f"target task loss {target:.4f} (from the main full-FT runs)")
    for i, spec in enumerate(todo, 1):
        if threads_fn is not None:
            torch.set_num_threads(threads_fn())
        ref = reference_count(table, spec.budget)
        log(f"[probe {i}/{len(todo)}] {spec.run_id} ({torch.get_num_threads()} threads), target {target:.4f}")
        rec = train_run(base_model, spec, table, data, cfg, base, target, ref, progress)
        atomic_write_json(pdir / "runs" / f"{spec.run_id}.json", rec)
        done[spec.run_id] = rec
        st = f"reached at step {rec['steps_to_target']}" if rec["reached_target"] else _steps(rec, cfg)
        log(f"    {spec.run_id}: {st}, task PPL {rec['task_ppl']:.2f}, control PPL "
            f"{rec['control_ppl']:.2f}, forgetting ×{rec['forgetting']:.4f}, {rec['wall_s']:.0f} s")
    return done


def write_probe_report(cfg: BenchConfig, out: Path, specs: Sequence[RunSpec], command: str = "") -> str:
    """``out/lr_probe/results.md``: per method, the probe runs next to the main runs of the same
    method, budget and seed (every LR of the main grid), sorted by LR."""
    out = Path(out)
    target, main = probe_target(cfg, out)
    probe = load_runs(out / PROBE_DIR, cfg)
    base = _read_base(out)
    lines = ["# Forgetting benchmark: LR probe", ""]
    if command:
        lines += [f"Latest command: `{command}` (the table holds every probe run in `{PROBE_DIR}/runs`)", ""]
    lines += [f"Same model, data, settings (config {cfg.fingerprint()}), training and evaluation code as the main "
              f"runs in `{out.name}/runs`; only the learning rate differs. Target held-out task loss "
              f"{target:.4f} (PPL {_ppl(target):.2f}, curve set), from the main full-FT runs; cap {cfg.cap_steps} "
              f"steps. Forgetting = control PPL after / before"
              + ("" if base is None else f" ({_ppl(base['control_final']):.2f})") + ".", "",
              "| method | budget | LR | source | reached target (step) | task PPL | control PPL | forgetting |",
              "|---|---|---|---|---|---|---|---|"]
    missing = [s.run_id for s in specs if s.run_id not in probe]
    # Every probe run finished so far (this command's and earlier ones'), grouped by method, budget, seed.
    group = lambda r: (r["method"], r["budget"], r["seed"])  # noqa: E731
    keys = sorted(dict.fromkeys([(s.method, s.budget, s.seed) for s in specs] + [group(r) for r in probe.values()]),
                  key=lambda k: (k[1], METHODS.index(k[0]), k[2]))
    for m, b, seed in keys:
        rows = [("main", r) for r in main.values() if group(r) == (m, b, seed)]
        rows += [("probe", r) for r in probe.values() if group(r) == (m, b, seed)]
        for src, r in sorted(rows, key=lambda x: (x[1]["lr"], x[0])):
            name = LABELS[m] + (f" (seed {seed})" if m == "random" else "")
            reached = (f"diverged at {r['steps']}" if r.get("diverged") else
                       f"yes ({r['steps_to_target']})" if r["reached_target"] else f"no (cap {cfg.cap_steps})")
            lines.append(f"| {name} | {b:g} | {r['lr']:g} | {src} | {reached} | {r['task_ppl']:.2f} | "
                         f"{r['control_ppl']:.3f} | ×{r['forgetting']:.4f} |")
    if missing:
        lines += ["", f"NOT FINISHED: {len(missing)} probe run(s) missing: {', '.join(missing)}. "
                  "Resume with the same command (finished runs are kept, not redone)."]
    else:
        lines += ["", f"All {len(specs)} probe run(s) of the latest command finished; {len(probe)} probe run(s) in all."]
    text = "\n".join(lines) + "\n"
    (out / PROBE_DIR).mkdir(parents=True, exist_ok=True)
    (out / PROBE_DIR / "results.md").write_text(text, encoding="utf-8")
    return text
