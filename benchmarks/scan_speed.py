#!/usr/bin/env python
"""Scan speed: how long does it take to get κ for every weight matrix of a model, and how exact is it?

Three ways of computing κ = σ_max / σ_min for the same tensors, timed in the same run:

* **reference** — what the original kappaTune code does: per tensor
  ``torch.linalg.svd(W.float(), full_matrices=False)`` (singular vectors included), κ = S[0] / S[-1].
* **svdvals fp32** — ``torch.linalg.svdvals(W.float())`` (singular values only, float32), the method
  of PEFT's kappaTune helper (PEFT also adds 1e-8 to σ_min; left out here to measure fp32 alone).
* **kappatune** — ``kappatune.scan(model, max_dim=..., cache=None, progress=False)`` (float64 Gram +
  eigvalsh, exact float64 ``svdvals`` fallback for ill-conditioned matrices; see kappatune/kappa.py).

Every κ is compared with a float64 reference, ``numpy.linalg.svd(W.double().numpy(),
compute_uv=False)``, computed once and not timed: the largest relative κ difference, and whether
the ranking (names sorted by κ, ties by name) equals the float64 ranking.

Then the cache: ``kappatune.scan(model, cache=<fresh dir>)`` once cold, then warm ``--repeats`` times
(each warm call re-reads the cache file, as a new process would), and the digest cost alone
(``kappatune.tensor_digest`` of every eligible tensor).

The number of matrices that took kappatune's exact ``svdvals`` fallback (instead of the Gram path)
is counted by wrapping ``kappatune.kappa._extremes_from_svdvals`` during the timed kappatune runs
(the wrapper costs microseconds per call) and, per module kind, by applying kappa.py's criterion
½·sqrt(max(m, n))·ε·κ² > 1e-7 to the float64 κ.

Last, on SmolLM2 and when ``peft`` is installed (``--no-peft`` skips it), PEFT's own
``peft.helpers.find_kappa_target_modules`` against kappatune's, cold and warm cache
(``benchmarks/peft_compare.py``'s :func:`compare`).

Then the 2-process row: ``benchmarks/scan_distributed.py --rounds 2 --repeats 3`` (the scan sharded
over 2 gloo ranks against 1 process with 1 and 2 threads; ``--no-distributed`` skips it).

Models: (a) a Llama-style model built from a config at TinyLlama-1.1B layer shapes (hidden 2048,
intermediate 5632, 32 heads, 4 kv heads, vocab 32000; ``--layers`` layers, random init, seed 0);
(b) the real pretrained SmolLM2-135M (``examples/offline.py: load_smollm2()``, dequantized Q4_1
GGUF). ``max_dim=16384`` for every method, so the embeddings / lm_head are skipped by all.

Run (from the repository root)::

    python benchmarks/scan_speed.py                     # both models, 2 TinyLlama layers, 3 repeats
    python benchmarks/scan_speed.py --only smollm2 --repeats 5 --json scan_speed.json
    python benchmarks/scan_speed.py --skip-real --layers 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple


def _threads_arg(argv: List[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return pre.parse_known_args(argv)[0].threads


if __name__ == "__main__":
    # numpy's OpenBLAS (float64 reference) fixes its thread count when numpy is imported: use
    # --threads there too, so no thread pool oversubscribes the cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(max(1, _threads_arg(sys.argv[1:]))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kappatune  # noqa: E402
from kappatune import kappa as kappa_mod  # noqa: E402
from kappatune.selection import module_kind  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_DIM = 16384
EPS64 = float(np.finfo(np.float64).eps)
GRAM_BUDGET = 1e-7  # kappatune.kappa._GRAM_REL_ERR_BUDGET (replicated for the per-kind breakdown)


# --------------------------------------------------------------------------------------- models
def build_tinyllama(layers: int, seed: int = 0) -> torch.nn.Module:
    """LlamaForCausalLM at TinyLlama-1.1B layer shapes, random init (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def load_smollm2() -> torch.nn.Module:
    sys.path.insert(0, str(ROOT / "examples"))
    import offline

    model, _ = offline.load_smollm2(torch.float32, with_tokenizer=False)
    return model.eval()


def eligible_tensors(model: torch.nn.Module, max_dim: int) -> List[Tuple[str, torch.Tensor]]:
    """The tensors every method analyses: floating, ≥2-D, no side longer than ``max_dim``.

    Same rule as ``kappatune.scan(min_ndim=2, max_dim=max_dim)`` for 2-D weights (tied weights
    once, via ``named_parameters``); the benchmark checks that both give the same names.
    """
    out = []
    for name, p in model.named_parameters():
        if p.ndim != 2 and p.ndim >= 2:
            raise SystemExit(f"{name}: {p.ndim}-D weight; this benchmark handles 2-D weights only")
        if p.ndim == 2 and p.is_floating_point() and max(p.shape) <= max_dim:
            out.append((name, p.detach()))
    return out


# --------------------------------------------------------------------------------------- methods
def kappas_reference(tensors: List[Tuple[str, torch.Tensor]]) -> Dict[str, float]:
    out = {}
    for name, w in tensors:
        _, s, _ = torch.linalg.svd(w.float(), full_matrices=False)
        out[name] = (s[0] / s[-1]).item()
    return out


def kappas_svdvals32(tensors: List[Tuple[str, torch.Tensor]]) -> Dict[str, float]:
    out = {}
    for name, w in tensors:
        s = torch.linalg.svdvals(w.float())
        out[name] = (s[0] / s[-1]).item()
    return out


def kappas_float64(tensors: List[Tuple[str, torch.Tensor]]) -> Dict[str, float]:
    out = {}
    for name, w in tensors:
        s = np.linalg.svd(w.double().numpy(), compute_uv=False)
        out[name] = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    return out


class FallbackCounter:
    """Counts (and times) the matrices sent to kappatune's exact float64 svdvals path."""

    def __init__(self) -> None:
        self.matrices = 0
        self.seconds = 0.0
        self._orig = None

    def __enter__(self) -> "FallbackCounter":
        self._orig = orig = kappa_mod._extremes_from_svdvals

        def wrapped(a):
            t0 = time.perf_counter()
            try:
                return orig(a)
            finally:
                self.seconds += time.perf_counter() - t0
                self.matrices += int(a.shape[0])

        kappa_mod._extremes_from_svdvals = wrapped
        return self

    def __exit__(self, *exc) -> None:
        kappa_mod._extremes_from_svdvals = self._orig


class Timing:
    """Wall-clock and process CPU time of one call (CPU time: all threads of this process)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        self.out = fn()
        self.wall = time.perf_counter() - w0
        self.cpu = time.process_time() - c0


def med(xs: List[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------------------- metrics
def ranking(k: Dict[str, float]) -> List[str]:
    return sorted(k, key=lambda n: (k[n], n))


def max_rel_diff(k: Dict[str, float], ref: Dict[str, float]) -> float:
    worst = 0.0
    for n, r in ref.items():
        v = k[n]
        if math.isinf(r) or math.isinf(v):
            d = 0.0 if v == r else math.inf
        else:
            d = abs(v - r) / r
        worst = max(worst, d)
    return worst


def rank_moves(k: Dict[str, float], ref: Dict[str, float]) -> int:
    """How many positions of the ranking differ from the float64 ranking."""
    return sum(a != b for a, b in zip(ranking(k), ranking(ref)))


def gram_criterion_fallback(shape: Tuple[int, int], kappa: float) -> bool:
    """kappa.py's switch to the exact path, evaluated at the float64 κ (for the per-kind breakdown)."""
    return not (0.5 * math.sqrt(max(shape)) * EPS64 * kappa * kappa <= GRAM_BUDGET)


def fmt_pct(x: float) -> str:
    p = 100 * x
    return f"{p:.1f}%" if p >= 10 else (f"{p:.2f}%" if p >= 0.1 else f"{p:.3f}%")


def fmt_s(x: float) -> str:
    return f"{x:.4f}" if x < 0.1 else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


# --------------------------------------------------------------------------------------- bench
REF = "reference: torch.linalg.svd fp32 (kappaTune)"
OURS = "kappatune.scan(cache=None)"


def bench_model(label: str, model: torch.nn.Module, repeats: int, log: Callable[[str], None]) -> dict:
    tensors = eligible_tensors(model, MAX_DIM)
    n_params = sum(w.numel() for _, w in tensors)
    log(f"[{label}] {len(tensors)} eligible tensors ({n_params / 1e6:.1f}M weights), "
        f"max_dim={MAX_DIM}; float64 reference ...")
    t64 = Timing(lambda: kappas_float64(tensors))
    k64: Dict[str, float] = t64.out  # type: ignore[assignment]
    log(f"[{label}] float64 numpy SVD (untimed reference) took {t64.wall:.1f}s")

    def ours() -> Dict[str, float]:
        table = kappatune.scan(model, max_dim=MAX_DIM, cache=None, progress=False)
        return {e.name: e.kappa for e in table}

    methods: Dict[str, Callable[[], Dict[str, float]]] = {
        REF: lambda: kappas_reference(tensors),
        "torch.linalg.svdvals fp32 (PEFT)": lambda: kappas_svdvals32(tensors),
        OURS: ours,
    }
    wall: Dict[str, List[float]] = {m: [] for m in methods}
    cpu: Dict[str, List[float]] = {m: [] for m in methods}
    kappas: Dict[str, Dict[str, float]] = {}
    counter = FallbackCounter()
    fallback_per_run: List[int] = []
    fallback_seconds: List[float] = []
    # Interleave the methods repeat by repeat, so background load hits all of them alike.
    for r in range(repeats):
        for m, fn in methods.items():
            if m == OURS:
                before_n, before_s = counter.matrices, counter.seconds
                with counter:
                    t = Timing(fn)
                fallback_per_run.append(counter.matrices - before_n)
                fallback_seconds.append(counter.seconds - before_s)
            else:
                t = Timing(fn)
            wall[m].append(t.wall)
            cpu[m].append(t.cpu)
            kappas[m] = t.out  # type: ignore[assignment]
            log(f"[{label}] repeat {r + 1}/{repeats}  {m}: {t.wall:.2f}s wall, {t.cpu:.2f}s CPU")

    names_ours = set(kappas[OURS])
    if names_ours != set(k64):
        raise SystemExit(f"[{label}] kappatune.scan analysed a different set of tensors: only ours "
                         f"{sorted(names_ours - set(k64))[:5]}, only others {sorted(set(k64) - names_ours)[:5]}")

    # Cache: cold once, then warm `repeats` times; each warm call builds a new KappaCache from the
    # path (reads the file again), as a new process would.
    with tempfile.TemporaryDirectory(prefix="kappatune-bench-") as tmp:
        cold = Timing(lambda: kappatune.scan(model, max_dim=MAX_DIM, cache=tmp, progress=False))
        warm = [Timing(lambda: kappatune.scan(model, max_dim=MAX_DIM, cache=tmp, progress=False))
                for _ in range(repeats)]
        if [(e.name, e.kappa) for e in warm[-1].out] != [(e.name, e.kappa) for e in cold.out]:
            raise SystemExit(f"[{label}] warm-cache table differs from the cold one")
    digest = [Timing(lambda: [kappatune.tensor_digest(w) for _, w in tensors]) for _ in range(repeats)]
    log(f"[{label}] cache cold {cold.wall:.2f}s, warm {med([t.wall for t in warm]):.3f}s, "
        f"digest only {med([t.wall for t in digest]):.3f}s")

    shapes = {n: tuple(w.shape) for n, w in tensors}
    by_kind: Dict[str, List[int]] = {}
    for n, k in k64.items():
        c = by_kind.setdefault(module_kind(n) or "?", [0, 0])
        c[gram_criterion_fallback(shapes[n], k)] += 1

    rows = []
    for m in methods:
        rows.append(dict(method=m, wall_median_s=med(wall[m]), wall_min_s=min(wall[m]), cpu_median_s=med(cpu[m]),
                         wall_s=wall[m], cpu_s=cpu[m],
                         speedup_wall=med(wall[REF]) / med(wall[m]), speedup_cpu=med(cpu[REF]) / med(cpu[m]),
                         max_rel_diff=max_rel_diff(kappas[m], k64),
                         ranking_identical=ranking(kappas[m]) == ranking(k64),
                         rank_positions_moved=rank_moves(kappas[m], k64)))
    k_vals = sorted(k64.values())
    return dict(
        model=label, tensors=len(tensors), weights=n_params, repeats=repeats,
        float64_reference_s=t64.wall, kappa_min=k_vals[0], kappa_median=med(k_vals), kappa_max=k_vals[-1],
        methods=rows,
        cache=dict(cold_wall_s=cold.wall, cold_cpu_s=cold.cpu,
                   warm_wall_s=[t.wall for t in warm], warm_cpu_s=[t.cpu for t in warm],
                   warm_wall_median_s=med([t.wall for t in warm]), warm_cpu_median_s=med([t.cpu for t in warm]),
                   warm_over_cold_wall=med([t.wall for t in warm]) / cold.wall,
                   warm_over_cold_cpu=med([t.cpu for t in warm]) / cold.cpu,
                   digest_wall_median_s=med([t.wall for t in digest]),
                   digest_cpu_median_s=med([t.cpu for t in digest]),
                   kappa_wall_median_s=med(wall[OURS]), kappa_cpu_median_s=med(cpu[OURS])),
        fallback=dict(matrices_per_scan=fallback_per_run[-1], gram_path=len(tensors) - fallback_per_run[-1],
                      per_run=fallback_per_run, fallback_wall_median_s=med(fallback_seconds),
                      by_kind_gram_fallback=by_kind),
    )


def markdown(res: dict) -> str:
    lines = [
        f"**{res['model']}** — {res['tensors']} tensors, {res['weights'] / 1e6:.1f}M weights, "
        f"κ from {res['kappa_min']:.3g} to {res['kappa_max']:.3g} (median {res['kappa_median']:.3g}); "
        f"median of {res['repeats']} runs",
        "",
        "| method | wall s (median) | wall s (min) | CPU s (median) | speed-up vs reference, wall | "
        "speed-up, CPU | max rel. κ diff vs float64 | ranking = float64 |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in res["methods"]:
        same = "yes" if r["ranking_identical"] else f"no ({r['rank_positions_moved']} positions differ)"
        lines.append(f"| {r['method']} | {fmt_s(r['wall_median_s'])} | {fmt_s(r['wall_min_s'])} | "
                     f"{fmt_s(r['cpu_median_s'])} | {r['speedup_wall']:.2f}× | {r['speedup_cpu']:.2f}× | "
                     f"{r['max_rel_diff']:.1e} | {same} |")
    c = res["cache"]
    ref = res["methods"][0]
    lines.append(f"| kappatune.scan(cache=dir), cold (1 run) | {fmt_s(c['cold_wall_s'])} | {fmt_s(c['cold_wall_s'])} | "
                 f"{fmt_s(c['cold_cpu_s'])} | {ref['wall_median_s'] / c['cold_wall_s']:.2f}× | "
                 f"{ref['cpu_median_s'] / c['cold_cpu_s']:.2f}× | same as above | |")
    lines.append(f"| kappatune.scan(cache=dir), warm | {fmt_s(c['warm_wall_median_s'])} | "
                 f"{fmt_s(min(c['warm_wall_s']))} | {fmt_s(c['warm_cpu_median_s'])} | "
                 f"{ref['wall_median_s'] / c['warm_wall_median_s']:.0f}× | "
                 f"{ref['cpu_median_s'] / c['warm_cpu_median_s']:.0f}× | same as cold | |")
    f = res["fallback"]
    kinds = ", ".join(f"{k} {g}/{g + x}" for k, (g, x) in sorted(f["by_kind_gram_fallback"].items()))
    lines += [
        "",
        f"- warm / cold: **{fmt_pct(c['warm_over_cold_wall'])}** wall, {fmt_pct(c['warm_over_cold_cpu'])} CPU; "
        f"warm / median uncached scan: {fmt_pct(c['warm_wall_median_s'] / c['kappa_wall_median_s'])} wall, "
        f"{fmt_pct(c['warm_cpu_median_s'] / c['kappa_cpu_median_s'])} CPU",
        f"- digest cost alone (`tensor_digest` of all {res['tensors']} tensors): "
        f"{fmt_s(c['digest_wall_median_s'])} s wall = "
        f"{fmt_pct(c['digest_wall_median_s'] / c['kappa_wall_median_s'])} of the uncached κ scan "
        f"({fmt_pct(c['digest_cpu_median_s'] / c['kappa_cpu_median_s'])} in CPU time)",
        f"- kappatune paths: {f['gram_path']} matrices on the float64 Gram path, {f['matrices_per_scan']} on "
        f"the exact float64 svdvals fallback ({fmt_pct(f['fallback_wall_median_s'] / c['kappa_wall_median_s'])} "
        f"of the uncached scan's wall time spent in the fallback); Gram path per kind: {kinds}",
        f"- float64 numpy SVD reference (not part of the table): {res['float64_reference_s']:.1f} s wall",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the TinyLlama-shape model (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported (default 3)")
    ap.add_argument("--skip-real", action="store_true", help="skip the real SmolLM2-135M")
    ap.add_argument("--only", choices=["tinyllama", "smollm2"], help="benchmark one model only")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads, also numpy's OpenBLAS threads unless OPENBLAS_NUM_THREADS is set "
                         "(default: os.cpu_count())")
    ap.add_argument("--no-peft", action="store_true",
                    help="skip the comparison with PEFT's find_kappa_target_modules (run when peft is installed)")
    ap.add_argument("--no-distributed", action="store_true",
                    help="skip the 2-process row (benchmarks/scan_distributed.py, about a minute)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is None or args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.only == "smollm2" and args.skip_real:
        ap.error("--only smollm2 and --skip-real exclude each other")
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    env = dict(openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"), torch=torch.__version__,
               numpy=np.__version__, kappatune=kappatune.__version__,
               python=platform.python_version(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               machine=platform.machine())
    print(f"# kappatune scan speed (torch {env['torch']}, {env['torch_threads']} threads, "
          f"{env['cpu_count']} CPUs, max_dim={MAX_DIM})\n")
    results = []
    if args.only in (None, "tinyllama"):
        model = build_tinyllama(args.layers)
        results.append(bench_model(f"TinyLlama-1.1B shapes, {args.layers} layer(s), random init", model,
                                   args.repeats, log))
        del model
        print(markdown(results[-1]) + "\n", flush=True)
    if args.only == "smollm2" or (args.only is None and not args.skip_real):
        model = load_smollm2()
        results.append(bench_model("SmolLM2-135M (pretrained, dequantized Q4_1)", model, args.repeats, log))
        print(markdown(results[-1]) + "\n", flush=True)
        if not args.no_peft:
            try:
                import peft  # noqa: F401
            except ImportError:
                log("peft is not installed: skipping the find_kappa_target_modules comparison")
            else:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from peft_compare import compare

                report = compare(model, top_p=0.2, repeats=args.repeats, log=log)
                results[-1]["peft_find_kappa_target_modules"] = report
                print("### SmolLM2-135M: PEFT's `find_kappa_target_modules` vs kappatune's\n\n" + report + "\n",
                      flush=True)
        del model
    if not args.no_distributed:
        # The 2-process row: the same scan sharded over 2 gloo ranks against 1 process (fresh
        # processes, so it runs as its own script; see benchmarks/scan_distributed.py).
        import subprocess

        log("2 ranks vs 1: benchmarks/scan_distributed.py --rounds 2 --repeats 3")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "scan_distributed.py"),
                               "--rounds", "2", "--repeats", "3"], capture_output=True, text=True)
        table = proc.stdout[proc.stdout.find("\nκ scan of"):].strip() if proc.returncode == 0 else ""
        if not table:
            log(f"scan_distributed.py failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        else:
            print("### The scan sharded over 2 processes (gloo) vs 1\n\n" + table + "\n", flush=True)
            results.append({"model": "2 ranks vs 1 (scan_distributed.py)", "report": table})
    if args.json:
        args.json.write_text(json.dumps(dict(env=env, argv=sys.argv[1:], results=results), indent=1))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
