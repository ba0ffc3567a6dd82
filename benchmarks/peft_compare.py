"""PEFT's ``find_kappa_target_modules`` versus kappatune's, on SmolLM2-135M (offline, CPU).

Times, in one run on the same loaded model:

* ``peft.helpers.find_kappa_target_modules`` (float32 ``svdvals`` per module, no cache);
* ``kappatune.integrations.peft.find_kappa_target_modules`` with a cold κ cache (a fresh cache
  folder each repeat: digests + exact float64 κ + cache write) and with a warm one (digests only);

reports medians and ratios against PEFT, whether the selected target sets agree, and how far PEFT's
float32 κ are from the exact ones over all candidates. Prints a markdown table.
``benchmarks/scan_speed.py`` runs the same comparison (:func:`compare`) on its SmolLM2 model.

Usage::

    python benchmarks/peft_compare.py                  # 3 repeats, top_p=0.2
    python benchmarks/peft_compare.py --repeats 5 --top-p 0.1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
import offline  # noqa: E402


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def compare(model: torch.nn.Module, top_p: float = 0.2, repeats: int = 3, log=print) -> str:
    """Time PEFT's and kappatune's ``find_kappa_target_modules`` on ``model``; a markdown report."""
    import peft
    from peft.helpers import KappaTuneSelector

    from kappatune.integrations.peft import find_kappa_target_modules, kappa_lora_targets

    t_peft, ref = timed(lambda: peft.find_kappa_target_modules(model, top_p=top_p, show_progress=False),
                        repeats)
    log(f"peft: {[round(t, 2) for t in t_peft]}")

    with tempfile.TemporaryDirectory() as tmp:
        dirs = iter(range(10 ** 6))
        t_cold, ours = timed(lambda: find_kappa_target_modules(
            model, top_p=top_p, show_progress=False, cache=os.path.join(tmp, f"cold{next(dirs)}")), repeats)
        log(f"kappatune cold: {[round(t, 2) for t in t_cold]}")
        warm_dir = os.path.join(tmp, "warm")
        find_kappa_target_modules(model, top_p=top_p, show_progress=False, cache=warm_dir)
        t_warm, ours_warm = timed(lambda: find_kappa_target_modules(
            model, top_p=top_p, show_progress=False, cache=warm_dir), repeats)
        log(f"kappatune warm: {[round(t, 2) for t in t_warm]}")
        exact = {t.name: t.kappa for t in kappa_lora_targets(model, show_progress=False, cache=warm_dir)}

    sel = KappaTuneSelector(model, show_progress=False)
    sel._compute_kappas()
    approx = dict(sel._condition_numbers or {})
    common = sorted(set(approx) & set(exact))
    rel = max(abs(approx[n] - exact[n]) / exact[n] for n in common)
    rank_peft = sorted(common, key=approx.get)
    rank_ours = sorted(common, key=exact.get)
    moved = sum(a != b for a, b in zip(rank_peft, rank_ours))

    same_list = ours == ref and ours_warm == ref
    same_set = (set(ours["target_modules"]) == set(ref["target_modules"])
                and set(ours["target_parameters"] or []) == set(ref["target_parameters"] or []))
    med_p = statistics.median(t_peft)
    rows = [
        ("PEFT `find_kappa_target_modules`", t_peft),
        ("kappatune, cold cache", t_cold),
        ("kappatune, warm cache", t_warm),
    ]
    out = [f"| method ({len(common)} linear modules, top_p={top_p}, median of {repeats}) | median s | "
           f"min s | speed-up vs PEFT |", "|---|---|---|---|"]
    for label, ts in rows:
        m = statistics.median(ts)
        out.append(f"| {label} | {m:.2f} | {min(ts):.2f} | {med_p / m:.1f}x |")
    out.append("")
    out.append(f"- selected targets: {len(ref['target_modules'])} modules; identical list (same order) as PEFT: "
               f"{same_list}; identical set: {same_set}")
    out.append(f"- all {len(common)} candidates: PEFT's float32 κ vs exact κ, max relative difference {rel:.1e}; "
               f"{moved} of {len(common)} rank positions differ")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-p", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    model, _ = offline.load_smollm2(torch.float32, with_tokenizer=False)
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, peft {peft.__version__}, top_p={args.top_p}, "
          f"{args.repeats} repeats", flush=True)
    print()
    print(compare(model, args.top_p, args.repeats, log=lambda m: print(m, flush=True)))


if __name__ == "__main__":
    main()
