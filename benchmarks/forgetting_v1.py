"""Forgetting benchmark v1 (kept as the record of the first study; the current study is
``benchmarks/forgetting.py``, v2). Does κ-selection forget less? SmolLM2-135M, offline, on CPU.

Task: continued pre-training (causal LM loss) on the King James Bible. Control: Wikipedia summaries
(general knowledge). Methods at an equal trainable-parameter budget (κ-low = kappatune's selection,
κ-high = the reverse ablation, random tensors over 3 seeds, LoRA of the same size), plus full
fine-tuning. Full FT trains a fixed number of steps and sets the target held-out task loss; every
other run trains until it reaches that loss (matched adaptation), then we measure how much the
control perplexity went up (forgetting = control PPL after / before).

Usage::

    python benchmarks/forgetting_v1.py                 # the full benchmark (resumable, per run)
    python benchmarks/forgetting_v1.py --quick         # a few minutes: 1 budget, 1 LR, 1 seed
    python benchmarks/forgetting_v1.py --only kappa_low random   # part of it (full FT first if needed)
    python benchmarks/forgetting_v1.py --report        # aggregate finished runs: table + plot only
    python benchmarks/forgetting_v1.py --lr-probe 5e-4 # extra LRs for κ-low/κ-high/random at budget 0.05
    python benchmarks/forgetting_v1.py --tiny --quick --out /tmp/x   # tiny config model, synthetic data

Outputs (under ``--out``, default ``benchmarks/results/forgetting``): ``runs/<run>.json`` (one per
finished run, kept and never redone), ``results.md``, ``summary.json``, ``tradeoff.png``.
``--lr-probe`` runs (method, LR) pairs outside the main LR grid against the main full-FT target, with
the same code, into ``lr_probe/runs/`` and ``lr_probe/results.md``; the main runs are left untouched.
The helpers live in ``benchmarks/forgetting_lib.py``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import forgetting_lib as fl  # noqa: E402


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _threads_fn(spec: str):
    """``auto``: all cores, or 1 when other processes already load them (under oversubscription
    OpenMP's spinning threads made a training step 4-5x slower with 2 threads than with 1 here)."""
    n = os.cpu_count() or 1
    if spec != "auto":
        try:
            k = int(spec)
        except ValueError:
            raise SystemExit(f"--threads must be a positive integer or 'auto', got {spec!r}") from None
        if k < 1:
            raise SystemExit(f"--threads must be >= 1, got {k}")
        return lambda: k

    def pick() -> int:
        busy = os.getloadavg()[0] - torch.get_num_threads()   # load that is not ours (roughly)
        return 1 if busy > 0.5 * n else n

    return pick


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes: 1 budget, 1 LR per method, 1 random seed")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny LlamaForCausalLM built from a config and synthetic windows (tests the harness)")
    ap.add_argument("--only", nargs="+", metavar="METHOD", choices=fl.METHODS,
                    help=f"run only these methods ({', '.join(fl.METHODS)}); the full-FT runs that set the "
                         "target run first if they are missing")
    ap.add_argument("--report", action="store_true", help="only aggregate finished runs (table, plot)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results/forgetting, or …/forgetting/quick)")
    ap.add_argument("--threads", default="auto",
                    help="torch threads: a number, or 'auto' (default): os.cpu_count(), except 1 while the "
                         "1-minute load average shows the cores busy with other processes (chosen per run)")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--sweep-all-budgets", action="store_true",
                    help="sweep the LRs at every budget (default: on the first budget, reused for the others)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--no-plot", action="store_true", help="skip tradeoff.png")
    probe = ap.add_argument_group("LR probe (extra learning rates against the main runs' target)")
    probe.add_argument("--lr-probe", nargs="+", type=float, metavar="LR",
                       help="run --probe-methods at --probe-budget with these LRs (needs the main full-FT runs "
                            "in --out); results in <out>/lr_probe/; with --report only rewrite its results.md")
    probe.add_argument("--probe-methods", nargs="+", metavar="METHOD", choices=fl.METHODS[1:],
                       default=["kappa_low", "kappa_high", "random"],
                       help="methods for --lr-probe (default: kappa_low kappa_high random)")
    probe.add_argument("--probe-budget", type=float, default=0.05, help="budget for --lr-probe (default 0.05)")
    probe.add_argument("--probe-seed", type=int, default=0, help="random selection seed for --lr-probe (default 0)")
    return ap.parse_args(argv)


def config_for(args: argparse.Namespace) -> fl.BenchConfig:
    if args.tiny:
        cfg = fl.tiny_config(quick=args.quick)
    else:
        cfg = fl.quick_config() if args.quick else fl.full_config()
    if args.sweep_all_budgets:
        cfg.sweep_all_budgets = True
    return cfg


def default_out(args: argparse.Namespace) -> Path:
    if args.tiny:
        return ROOT / "benchmarks" / "results" / "tmp" / ("forgetting_tiny" + ("_quick" if args.quick else ""))
    base = ROOT / "benchmarks" / "results" / "forgetting"
    return base / "quick" if args.quick else base


def load(cfg: fl.BenchConfig, tiny: bool, log=_log):
    """(model, κ table, data). The real model's κ table goes through the repo's ``cache/``."""
    import kappatune

    if tiny:
        model, data = fl.tiny_model_and_data(cfg)
        table = kappatune.scan(model, cache=False, progress=False)
        return model, table, data
    sys.path.insert(0, str(ROOT / "examples"))
    import offline

    t = time.perf_counter()
    model, tok = offline.load_smollm2(torch.float32)
    log(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    table = kappatune.scan(model, max_dim=16384, cache=kappatune.KappaCache(ROOT / "cache"), progress=False)
    log(f"κ table in {time.perf_counter() - t:.1f} s (cache {ROOT / 'cache'}): {table!r}")
    t = time.perf_counter()
    data = fl.real_data(tok, cfg)
    log(f"token windows in {time.perf_counter() - t:.1f} s: train {tuple(data.train.shape)}, "
        f"curve {len(data.task_curve)}+{len(data.control_curve)}, final {len(data.task_final)}+"
        f"{len(data.control_final)} (fingerprint {data.fingerprint()})")
    return model, table, data


def lr_probe(args: argparse.Namespace, cfg: fl.BenchConfig, out: Path, cmd: str) -> int:
    """``--lr-probe``: extra runs against the main target; the main runs and report are not touched."""
    if args.only:
        raise SystemExit("--lr-probe and --only do not mix; use --probe-methods")
    try:
        specs = fl.probe_specs(args.lr_probe, args.probe_methods, args.probe_budget, args.probe_seed)
        fl.probe_target(cfg, out)          # fail before loading the model when the target is missing
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not args.report:
        threads_fn = _threads_fn(args.threads)
        torch.set_num_threads(threads_fn())
        model, table, data = load(cfg, args.tiny)
        fl.run_lr_probe(model, table, data, cfg, out, specs, progress=not args.no_progress, log=_log,
                        threads_fn=threads_fn)
    print(fl.write_probe_report(cfg, out, specs, command=cmd.strip()))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = config_for(args)
    out = args.out or default_out(args)
    given = list(sys.argv[1:] if argv is None else argv)
    cmd = "python benchmarks/forgetting_v1.py" + "".join(" " + shlex.quote(a) for a in given
                                                      if a not in ("--report", "--no-plot", "--no-progress"))
    if args.lr_probe is not None:
        return lr_probe(args, cfg, out, cmd)
    if not args.report:
        threads_fn = _threads_fn(args.threads)
        torch.set_num_threads(threads_fn())
        _log(f"config {cfg.fingerprint()}: seq_len {cfg.seq_len}, batch {cfg.batch}, full FT {cfg.ft_steps} steps, "
             f"cap {cfg.cap_steps}, budgets {list(cfg.budgets)}, LRs {cfg.lrs}, {torch.get_num_threads()} threads; "
             f"results in {out}")
        model, table, data = load(cfg, args.tiny)
        fl.run_benchmark(model, table, data, cfg, out, only=args.only, progress=not args.no_progress, log=_log,
                         max_runs=args.max_runs, threads_fn=threads_fn)
    text = fl.write_report(cfg, out, command=cmd.strip())
    plot = None if args.no_plot else fl.write_plot(cfg, out)
    print(text)
    if plot is not None:
        _log(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
