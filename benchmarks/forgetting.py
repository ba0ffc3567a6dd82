"""Forgetting study v2: does κ-selection forget less once module kind, learning rate and noise are controlled?

At one small budget (default 1.2 % of the linear weights, so κ has to choose *within* a module
kind) eight arms fine-tune the same model on a task corpus while a control corpus measures what
is forgotten: ``kappa_low`` (kappatune's ``param_budget`` selection), ``kappa_low_kind`` (κ ranked
within each module kind), ``random_kind`` (random tensors with κ-low's kind composition — the
control that separates κ from kind), ``kappa_high_kind`` (highest κ, same composition),
``random``, ``spectrum`` (Spectrum's SNR, arXiv 2406.06623), ``lora`` (equal parameter count) and
``full`` fine-tuning. 3 seeds (data order, random draws), 2 pre-registered LRs per arm chosen on
seed 0, a pre-registered endpoint (control-loss increase at a fixed task loss L*), paired
bootstrap CIs against κ-low with Holm's correction; then longer training and a second task in
sequence. The pre-registration is ``benchmarks/results/forgetting_v2/PREREGISTRATION.md``.

Usage::

    python benchmarks/forgetting.py                      # the study on the bundled SmolLM2-135M (resumable)
    python benchmarks/forgetting.py --report             # results.md, summary.json, plots from finished runs
    python benchmarks/forgetting.py --quick              # a few minutes: short runs, 2 seeds, 1 LR per arm
    python benchmarks/forgetting.py --dry-run            # budget, each arm's tensors, LoRA rank; no training

    # your own model and data, on a GPU (bf16 autocast), one command:
    python benchmarks/forgetting.py --model PATH/TO/causal-lm --task task.jsonl --control general.txt \\
        --task2 second_task.txt --device cuda --out results/my_forgetting

``--model``: any folder ``AutoModelForCausalLM.from_pretrained`` reads, or a ``.gguf`` file (default:
the bundled SmolLM2-135M-Instruct GGUF). ``--task/--control/--task2``: plain text (documents separated
by blank lines), JSONL (``--text-field``, default ``text``) or JSON; defaults KJV verses, Wikipedia
summaries, the interpreter's standard library source (offline). ``--tiny`` runs the harness on a tiny
config-built model with synthetic data (the test). The v1 harness was removed (history: commit 4335c7f).

Outputs (``--out``, default ``benchmarks/results/forgetting_v2``): ``runs/<run>.json`` (one per
finished run, with per-window losses, wall and CPU time), ``base.json``, ``selections.json`` (every
seed's tensors, fixed at the first start), ``results.md``, ``summary.json``, ``frontier.png``,
``sequential.png``. While running, ``runner.pid`` holds the (last started) runner's PID.

Several workers may share one ``--out`` folder, e.g. one per core (``--threads 1``) or one per GPU
(``CUDA_VISIBLE_DEVICES=i``): start the same command several times. Each worker claims a run in
``claims/`` before training it (a dead worker's claim is taken over), skips the runs others hold and
waits while only those are ready, since seeds 1.. wait for seed 0's LR grid.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    import forgetting_v2 as fv

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="causal-LM folder or .gguf file (default: bundled SmolLM2-135M)")
    ap.add_argument("--task", nargs="+", default=None, metavar="FILE", help="task corpus (default: KJV verses)")
    ap.add_argument("--control", nargs="+", default=None, metavar="FILE",
                    help="control corpus, never trained on (default: Wikipedia summaries)")
    ap.add_argument("--task2", nargs="+", default=None, metavar="FILE",
                    help="second task of the sequential phase (default: the Python standard library source)")
    ap.add_argument("--text-field", default="text", help="JSON/JSONL field with the text (default: text)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="on cuda: keep the weights in bfloat16 (default: float32 weights under bf16 autocast)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/forgetting_v2)")
    ap.add_argument("--quick", action="store_true", help="a few minutes: short runs, small eval sets, 2 seeds, 1 LR")
    ap.add_argument("--tiny", action="store_true", help="tiny config-built model, synthetic data (tests the harness)")
    ap.add_argument("--arms", nargs="+", default=None, choices=fv.ARMS, metavar="ARM",
                    help=f"only these arms (default all: {' '.join(fv.ARMS)}); kappa_low is always kept")
    ap.add_argument("--phases", nargs="+", default=list(fv.PHASES), choices=fv.PHASES,
                    help="phases to run (default: main long seq)")
    ap.add_argument("--budget", type=float, default=None, help="fraction of the linear weights (default 0.012)")
    ap.add_argument("--report", action="store_true", help="only aggregate finished runs")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and selections; train nothing")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--kappa-cache", type=Path, default=ROOT / "cache",
                    help="κ cache folder for the scan of the base model (default: the repo's cache/)")
    ap.add_argument("--bootstrap", type=int, default=2000,
                    help="bootstrap replicates the report starts from (default 2000, as pre-registered); doubled while "
                         "Monte-Carlo noise could flip a verdict")
    ap.add_argument("--bootstrap-max", type=int, default=256_000,
                    help="the most bootstrap replicates the report tries (default 256000)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--no-plot", action="store_true", help="skip the plots")
    return ap.parse_args(argv)


def config_for(args: argparse.Namespace):
    import forgetting_v2 as fv

    cfg = fv.tiny_config() if args.tiny else (fv.quick_config() if args.quick else fv.full_config())
    if args.arms:
        cfg.arms = tuple(a for a in fv.ARMS if a in set(args.arms) | {"kappa_low"})
        cfg.long_arms = tuple(a for a in cfg.long_arms if a in cfg.arms)
        cfg.seq_arms = tuple(a for a in cfg.seq_arms if a in cfg.arms)
    if args.budget is not None:
        if not 0 < args.budget:
            raise ValueError(f"--budget must be > 0, got {args.budget}")
        cfg.budget = args.budget
    dev = fv.pick_device(args.device)
    if dev.type == "cuda":
        cfg.precision = "bf16" if args.bf16_weights else "bf16-autocast"
    if not args.tiny and args.model is not None:
        cfg.model = str(args.model)
    for role in ("task", "control", "task2"):
        if getattr(args, role):
            setattr(cfg, role, ", ".join(getattr(args, role)))
    if not args.tiny and not args.task2:
        cfg.task2 = fv.python_stdlib_description()
    return cfg, dev


def default_out(args) -> Path:
    base = ROOT / "benchmarks" / "results"
    if args.tiny:
        return base / "tmp" / "forgetting_v2_tiny"
    return base / "tmp" / "forgetting_v2_quick" if args.quick else base / "forgetting_v2"


def load_model(path: Optional[str], dtype, log=_log):
    """(model, tokenizer): a causal-LM folder / .gguf file, or the bundled SmolLM2 GGUF."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.perf_counter()
    if path is None:
        sys.path.insert(0, str(ROOT / "examples"))
        import offline

        model, tok = offline.load_smollm2(dtype)
    else:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"--model {path}: no such folder or file")
        kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
        d = p.parent if p.suffix == ".gguf" else p
        try:
            tok = AutoTokenizer.from_pretrained(d, **kw)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kw)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {path}: not a causal-LM folder transformers can read ({str(e).splitlines()[0]})")
    log(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) in "
        f"{time.perf_counter() - t:.1f} s")
    return model, tok


def corpora_for(args, cfg):
    import forgetting_v2 as fv

    out = {}
    defaults = None
    for role in ("task", "control", "task2"):
        files = getattr(args, role)
        if files is None:
            if defaults is None:
                defaults = fv.default_corpora()
            files, _ = defaults[role]
        out[role] = fv.read_corpus(files, role, args.text_field)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except (ValueError, RuntimeError) as e:       # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    import forgetting_report as fr
    import forgetting_v2 as fv

    cfg, device = config_for(args)
    out = args.out or default_out(args)
    given = list(sys.argv[1:] if argv is None else argv)
    cmd = "python benchmarks/forgetting.py" + "".join(
        " " + shlex.quote(a) for a in given if a not in ("--report", "--no-plot", "--no-progress", "--dry-run"))
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        pid = out / "runner.pid"
        if not args.dry_run:
            pid.write_text(f"{os.getpid()}\n")
        _log(f"config {cfg.fingerprint()}: {cfg.steps} steps × {cfg.batch}×{cfg.seq_len} tokens, budget {cfg.budget}, "
             f"seeds {list(cfg.seeds)}, arms {list(cfg.arms)}, phases {args.phases}, device {device} "
             f"({cfg.precision}), {torch.get_num_threads()} threads; results in {out}")
        if args.tiny:
            model, data = fv.tiny_model_and_data(cfg)
            kcache = None
        else:
            dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
            model, tok = load_model(args.model, dtype)
            corpora = corpora_for(args, cfg)
            data = fv.build_data(tok, corpora, cfg, need_task2="seq" in args.phases, log=_log)
            kcache = args.kappa_cache
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        t = time.perf_counter()
        table = fv.kappa_scan(model, fv.make_cache(kcache), cfg.max_dim)
        _log(f"κ table in {time.perf_counter() - t:.1f} s: {table!r}")
        if args.dry_run:
            sel = fv.selections(table, model, cfg, out, lambda: fv.spectrum.snr_table(
                {n: p for n, p in model.named_parameters() if n in set(table.names)}), _log)
            fv.describe_selections(sel, _log)
            ready, waiting, _ = fv.plan(cfg, fv.load_runs(out, cfg), args.phases)
            _log(f"{len(ready)} run(s) ready: {', '.join(s.run_id for s in ready[:20])}"
                 + (" …" if len(ready) > 20 else "") + f"; {len(waiting)} group(s) waiting")
            return 0
        seq_cache = out / "tmp" / "kappa_cache_seq"
        fv.run_study(model, table, data, cfg, out, device, phases=args.phases, progress=not args.no_progress,
                     log=_log, max_runs=args.max_runs, kcache_path=seq_cache)
        ready, _, _ = fv.plan(cfg, fv.load_runs(out, cfg), args.phases)
        if not ready and pid.exists():
            pid.unlink()
    text = fr.write_report(cfg, out, command=cmd.strip(), B=args.bootstrap, plots=not args.no_plot,
                           B_max=args.bootstrap_max)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
