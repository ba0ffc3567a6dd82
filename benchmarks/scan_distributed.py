#!/usr/bin/env python
"""Scan speed with 2 processes: ``kappatune.scan`` sharded over 2 gloo ranks versus 1 process.

The same model, the same call (``kappatune.scan(model, max_dim=16384, cache=None,
progress=False)``), three ways, each in fresh processes started with ``torch.multiprocessing``:

* **1 rank × 1 thread** — no process group, ``torch.set_num_threads(1)`` (the baseline);
* **1 rank × 2 BLAS threads, 1 worker** — no process group, ``torch.set_num_threads(2)``,
  ``num_workers=1`` (what one process gets out of the same 2 cores by BLAS threading);
* **1 rank × 2 workers** — no process group, ``torch.set_num_threads(2)``, ``num_workers=None``
  (kappatune's default: 2 tensors at once in a thread pool, one BLAS thread each);
* **2 ranks × 1 thread** — a gloo process group (file:// rendezvous), 1 thread per rank: each rank
  computes κ of its share (longest-processing-time assignment by cost m·n·min(m, n)), the results
  are all-gathered and rank 0's table is broadcast.

Wall time of one scan: from a barrier before the call to the return of the call on every rank
(for 2 ranks the slower rank counts: the time is measured on each rank after a closing barrier).
Each process first runs one untimed scan (warm-up), then ``--repeats`` timed ones. The modes are
run round-robin ``--rounds`` times so that a change in the machine's load hits all of them; the
table shows the median (and min) over all timed scans of a mode, and the ratio of medians to the
1-rank baselines. The tables of all modes are compared (same names in the same order, κ within 1e-9 relative;
a different thread count may change the last bits of a BLAS result).

Model: ``LlamaForCausalLM`` from a config at SmolLM2-135M shapes (hidden 576, intermediate 1536,
9 heads, 3 kv heads, vocab 49152, tied embeddings), ``--layers`` layers (default 8), random init,
seed 0; ``max_dim=16384`` skips the embedding, leaving 7 matrices per layer.

Run (from the repository root)::

    python benchmarks/scan_distributed.py                     # 8 layers, 2 rounds × 3 repeats
    python benchmarks/scan_distributed.py --layers 30 --rounds 3 --save   # writes benchmarks/results/scan_distributed/

The load average of the machine is printed before and after: other processes on the same cores
make every figure slower, and the 2-rank one the most (it needs both cores at once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

MAX_DIM = 16384
MODES = [  # (label, ranks, threads per rank, num_workers per rank)
    ("1 rank × 1 thread", 1, 1, 1),
    ("1 rank × 2 BLAS threads, 1 worker", 1, 2, 1),
    ("1 rank × 2 workers (threads, 1 BLAS thread each; the default)", 1, 2, None),
    ("2 ranks × 1 thread (processes, gloo)", 2, 1, 1),
]


def build_model(layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _worker(rank: int, world: int, threads: int, workers, layers: int, repeats: int, init_file: str, out: str) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import kappatune

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build_model(layers)

        def one() -> float:
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            table = kappatune.scan(model, max_dim=MAX_DIM, cache=None, progress=False, num_workers=workers)
            if world > 1:
                dist.barrier()
            one.table = table  # type: ignore[attr-defined]
            return time.perf_counter() - t0

        one()  # warm-up, untimed
        times = [one() for _ in range(repeats)]
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"times": times, "table": one.table.to_dict()}, f)  # type: ignore[attr-defined]
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_mode(world: int, threads: int, workers, layers: int, repeats: int, tmp: Path, tag: str) -> Dict:
    out = tmp / f"{tag}.json"
    init = tmp / f"{tag}.init"
    # kappatune's CPU κ path runs numpy's OpenBLAS, whose thread count is read from the environment
    # when a process starts (torch.set_num_threads does not reach it): the spawned workers inherit it.
    saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    os.environ.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    try:
        tmp_mp.spawn(_worker, args=(world, threads, workers, layers, repeats, str(init), str(out)), nprocs=world,
                     join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return json.loads(out.read_text())


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed scans per process start")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin passes over the three modes")
    ap.add_argument("--modes", default="0,1,2,3", help="comma-separated subset of the modes (0-3), in the "
                    "order of the table; the ratios need mode 0 and 1")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--save", action="store_true",
                    help="write benchmarks/results/scan_distributed/results.json and results.md")
    ap.add_argument("--note", default="", help="a caveat printed under the machine line of results.md")
    args = ap.parse_args(argv)
    modes = [MODES[int(i)] for i in args.modes.split(",")]

    load0 = os.getloadavg()
    times: Dict[str, List[float]] = {label: [] for label, _, _, _ in modes}
    tables: Dict[str, Dict] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(args.rounds):
            for i, (label, world, threads, workers) in enumerate(modes):
                res = run_mode(world, threads, workers, args.layers, args.repeats, Path(d), f"r{rnd}m{i}")
                times[label].extend(res["times"])
                tables.setdefault(label, res["table"])
                print(f"round {rnd + 1}/{args.rounds}  {label:<40} "
                      + " ".join(f"{t:.3f}s" for t in res["times"]), file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    base = tables[modes[0][0]]
    names0 = [e["name"] for e in base["entries"]]
    k0 = {e["name"]: float(e["kappa"]) for e in base["entries"]}
    same_order = all([e["name"] for e in t["entries"]] == names0 for t in tables.values())
    max_rel = max(abs(float(e["kappa"]) - k0[e["name"]]) / k0[e["name"]]
                  for t in tables.values() for e in t["entries"])
    same = same_order and max_rel < 1e-9
    n = len(names0)
    med = {k: statistics.median(v) for k, v in times.items()}
    b1, b2 = med.get(MODES[0][0], float("nan")), med.get(MODES[1][0], float("nan"))

    lines = [f"κ scan of a Llama at SmolLM2-135M shapes, {args.layers} layers ({n} matrices, max_dim={MAX_DIM}); "
             f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPU(s)",
             f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; {args.rounds} rounds × {args.repeats} "
             f"timed scans per mode; total {time.perf_counter() - t_start:.0f}s", "",
             "| mode | scans | median wall (s) | min (s) | vs 1 rank × 1 thread | vs 1 rank × 2 BLAS threads |",
             "|---|---|---|---|---|---|"]
    for label, _, _, _ in modes:
        lines.append(f"| {label} | {len(times[label])} | {med[label]:.3f} | {min(times[label]):.3f} | "
                     f"{b1 / med[label]:.2f}× | {b2 / med[label]:.2f}× |")
    lines += ["", f"ratio = baseline median / mode median (> 1: faster). All modes give the same table: order "
              f"{'identical' if same_order else 'DIFFERENT'}, max relative κ difference {max_rel:.1e}"]
    print("\n" + "\n".join(lines))
    if args.save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_io import machine_info, write_results

        write_results("scan_distributed", {"layers": args.layers, "matrices": n, "rounds": args.rounds,
                                           "repeats": args.repeats, "load_before": load0, "load_after": load1,
                                           "times": times, "median": med, "same_order": same_order,
                                           "max_rel_kappa_diff": max_rel},
                      "\n".join(lines), title="Scan over 2 cores: threads (workers) vs processes (ranks)",
                      info=machine_info(), notes=args.note)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "layers": args.layers, "matrices": n, "rounds": args.rounds, "repeats": args.repeats,
            "load_before": load0, "load_after": load1, "times": times, "median": med,
            "same_order": same_order, "max_rel_kappa_diff": max_rel,
            "torch": torch.__version__, "cpus": os.cpu_count(),
        }, indent=1))
    if not same:
        sys.exit("the distributed scan gave another table than the single-process scan")


if __name__ == "__main__":
    main()
