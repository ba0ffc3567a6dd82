#!/usr/bin/env python
"""Scan speed: how long does it take to get κ for every weight matrix of a model, and how exact is it?

On the same tensors, in one run, interleaved repeat by repeat (so a change in machine load hits
every method alike), each at **1 thread** and at the **default threads** (``--threads``, default
``os.cpu_count()``; thread counts set with ``torch.set_num_threads`` and, for numpy's BLAS,
``threadpoolctl``):

* **reference** — what the original kappaTune code does: per tensor
  ``torch.linalg.svd(W.float(), full_matrices=False)`` (singular vectors included), κ = S[0] / S[-1];
* **PEFT** — ``torch.linalg.svdvals(W.float())`` (singular values only, float32), the method of
  PEFT's ``KappaTuneSelector`` (PEFT also adds 1e-8 to σ_min; left out here to time fp32 alone);
* **kappatune** — ``kappatune.scan(model, max_dim=..., cache=None, progress=False)``; at 1 thread
  ``num_workers=1``, at the default threads ``num_workers=None`` (= the thread count: that many
  tensors at once, one BLAS thread each; see kappatune/pipeline.py);
* **floor** — the least work any float64 method here does: upcast every tensor to float64
  (``W.double()``) and form its short-side Gram product (numpy ``x @ x.T``, BLAS dsyrk); at the
  default threads run the way kappatune runs (that many tensors at once, one BLAS thread each).

Every κ is compared with a float64 reference, ``numpy.linalg.svd(W.double().numpy(),
compute_uv=False)``, computed once and not timed: the largest relative κ difference, and whether
the ranking (names sorted by κ, ties by name) equals the float64 ranking.

Then the cache (default threads): ``kappatune.scan(model, cache=<fresh dir>)`` once cold, then warm
``--repeats`` times (each warm call re-reads the cache file, as a new process would), and the
digest cost alone (``kappatune.cache.tensor_digest`` of every eligible tensor). The matrices that took
kappatune's QR path and its SVD last resort are counted by wrapping ``kappatune.kappa._qr_extremes``
and ``kappatune.kappa._extremes_from_svdvals`` during the timed runs; per module kind by applying
kappa.py's Gram criterion ½·sqrt(max(m, n))·ε·κ² > 1e-7 to the float64 κ.

On SmolLM2 and when ``peft`` is installed (``--no-peft`` skips it), PEFT's own
``peft.helpers.find_kappa_target_modules`` against kappatune's, cold and warm cache
(``benchmarks/peft_compare.py``'s :func:`compare`), at the default threads.

Models: (a) a Llama-style model built from a config at TinyLlama-1.1B layer shapes (hidden 2048,
intermediate 5632, 32 heads, 4 kv heads, vocab 32000; ``--layers`` layers, random init, seed 0);
(b) the real pretrained SmolLM2-135M (``examples/offline.py: load_smollm2()``, dequantized Q4_1
GGUF). ``max_dim=16384`` for every method, so the embeddings / lm_head are skipped by all.

Writes ``benchmarks/results/scan_speed/results.json`` and ``results.md`` (``--out`` elsewhere).

Run (from the repository root)::

    python benchmarks/scan_speed.py                     # both models, 1 TinyLlama layer, 3 repeats
    python benchmarks/scan_speed.py --only smollm2 --repeats 5
    python benchmarks/scan_speed.py --skip-real --layers 2 --no-peft
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import kappatune  # noqa: E402
import kappatune.cache  # noqa: E402
from kappatune import kappa as kappa_mod  # noqa: E402
from kappatune.refs import module_kind  # noqa: E402
from results_io import machine_info, write_results  # noqa: E402

MAX_DIM = 16384
EPS64 = float(np.finfo(np.float64).eps)
GRAM_BUDGET = kappa_mod._GRAM_REL_ERR_BUDGET


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
    """The tensors every method analyses: floating, 2-D, no side longer than ``max_dim``
    (``kappatune.scan(min_ndim=2, max_dim=max_dim)``'s rule for 2-D weights; checked below)."""
    out = []
    for name, p in model.named_parameters():
        if p.ndim != 2 and p.ndim >= 2:
            raise SystemExit(f"{name}: {p.ndim}-D weight; this benchmark handles 2-D weights only")
        if p.ndim == 2 and p.is_floating_point() and max(p.shape) <= max_dim:
            out.append((name, p.detach()))
    return out


# --------------------------------------------------------------------------------------- methods
@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op threads and every BLAS (numpy's OpenBLAS, torch's MKL) at ``n`` threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(prev)


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


def _floor_one(w: torch.Tensor) -> float:
    x = w.double().numpy()
    g = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return float(g[0, 0])


def floor(tensors: List[Tuple[str, torch.Tensor]], workers: int) -> Dict[str, float]:
    """float64 upcast + short-side Gram product of every tensor; ``workers`` at once, 1 BLAS thread each."""
    if workers == 1:
        return {n: _floor_one(w) for n, w in tensors}
    with threads(1), ThreadPoolExecutor(workers) as pool:
        return dict(zip([n for n, _ in tensors], pool.map(_floor_one, [w for _, w in tensors])))


class PathCounter:
    """Counts (and times) the matrices sent to kappatune's QR path and SVD last resort."""

    def __init__(self) -> None:
        self.n = {"qr": 0, "svd": 0}
        self.seconds = {"qr": 0.0, "svd": 0.0}
        self._orig: Dict[str, Callable] = {}

    def __enter__(self) -> "PathCounter":
        for key, attr in (("qr", "_qr_extremes"), ("svd", "_extremes_from_svdvals")):
            orig = self._orig[attr] = getattr(kappa_mod, attr)

            def wrapped(a, *rest, _orig=orig, _key=key):
                t0 = time.perf_counter()
                try:
                    return _orig(a, *rest)
                finally:
                    self.seconds[_key] += time.perf_counter() - t0
                    self.n[_key] += int(a.shape[0])

            setattr(kappa_mod, attr, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for attr, fn in self._orig.items():
            setattr(kappa_mod, attr, fn)


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
    return sum(a != b for a, b in zip(ranking(k), ranking(ref)))


def gram_criterion_fallback(shape: Tuple[int, int], kappa: float) -> bool:
    return not (0.5 * math.sqrt(max(shape)) * EPS64 * kappa * kappa <= GRAM_BUDGET)


def fmt_pct(x: float) -> str:
    p = 100 * x
    return f"{p:.1f}%" if p >= 10 else (f"{p:.2f}%" if p >= 0.1 else f"{p:.3f}%")


def fmt_s(x: float) -> str:
    return f"{x:.4f}" if x < 0.1 else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


# --------------------------------------------------------------------------------------- bench
REF, PEFT, OURS, FLOOR = "reference: torch.linalg.svd fp32 (kappaTune)", "PEFT: torch.linalg.svdvals fp32", \
    "kappatune.scan(cache=None)", "floor: float64 upcast + Gram product"


def bench_model(label: str, model: torch.nn.Module, repeats: int, default_threads: int,
                log: Callable[[str], None], k64_cache: Optional[Path] = None) -> dict:
    tensors = eligible_tensors(model, MAX_DIM)
    n_params = sum(w.numel() for _, w in tensors)
    log(f"[{label}] {len(tensors)} eligible tensors ({n_params / 1e6:.1f}M weights), "
        f"max_dim={MAX_DIM}; float64 reference ...")
    import json

    digest = kappatune.cache.tensor_digest(torch.cat([w.reshape(-1)[:4096].float() for _, w in tensors]))
    stored = json.loads(k64_cache.read_text()) if k64_cache is not None and k64_cache.exists() else {}
    if digest in stored:  # the same tensors as a previous run (the reference is not timed)
        k64: Dict[str, float] = stored[digest]["kappa"]
        t64_wall = stored[digest]["seconds"]
    else:
        with threads(default_threads):
            t64 = Timing(lambda: kappas_float64(tensors))
        k64, t64_wall = t64.out, t64.wall  # type: ignore[assignment]
        if k64_cache is not None:
            stored[digest] = {"kappa": k64, "seconds": t64_wall}
            k64_cache.write_text(json.dumps(stored))
    log(f"[{label}] float64 numpy SVD (untimed reference) took {t64_wall:.1f}s")

    def ours(workers: Optional[int]) -> Callable[[], Dict[str, float]]:
        def run() -> Dict[str, float]:
            table = kappatune.scan(model, max_dim=MAX_DIM, cache=None, progress=False, num_workers=workers)
            return {e.name: e.kappa for e in table}
        return run

    settings = sorted({1, default_threads})
    methods: List[Tuple[str, int, Callable[[], Dict[str, float]]]] = []
    for th in settings:
        methods += [
            (REF, th, lambda: kappas_reference(tensors)),
            (PEFT, th, lambda: kappas_svdvals32(tensors)),
            (OURS, th, ours(1 if th == 1 else None)),
            (FLOOR, th, (lambda th=th: floor(tensors, th))),
        ]
    wall: Dict[Tuple[str, int], List[float]] = {(m, t): [] for m, t, _ in methods}
    cpu: Dict[Tuple[str, int], List[float]] = {(m, t): [] for m, t, _ in methods}
    kappas: Dict[Tuple[str, int], Dict[str, float]] = {}
    counter = PathCounter()
    paths_per_run: List[Dict[str, int]] = []
    path_seconds: Dict[int, List[Dict[str, float]]] = {th: [] for th in settings}
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[:r % len(methods)]  # rotate: no method always first
        for m, th, fn in order:
            with threads(th):
                if m == OURS:
                    before_n, before_s = dict(counter.n), dict(counter.seconds)
                    with counter:
                        t = Timing(fn)
                    paths_per_run.append({k: counter.n[k] - before_n[k] for k in counter.n})
                    path_seconds[th].append({k: counter.seconds[k] - before_s[k] for k in counter.n})
                else:
                    t = Timing(fn)
            wall[(m, th)].append(t.wall)
            cpu[(m, th)].append(t.cpu)
            if m != FLOOR:
                kappas[(m, th)] = t.out  # type: ignore[assignment]
            log(f"[{label}] repeat {r + 1}/{repeats}  {m} @ {th} thread(s): {t.wall:.2f}s wall, {t.cpu:.2f}s CPU")

    for th in settings:
        names_ours = set(kappas[(OURS, th)])
        if names_ours != set(k64):
            raise SystemExit(f"[{label}] kappatune.scan analysed a different set of tensors: only ours "
                             f"{sorted(names_ours - set(k64))[:5]}, only others {sorted(set(k64) - names_ours)[:5]}")

    with threads(default_threads), tempfile.TemporaryDirectory(prefix="kappatune-bench-") as tmp:
        cold = Timing(lambda: kappatune.scan(model, max_dim=MAX_DIM, cache=tmp, progress=False))
        warm = [Timing(lambda: kappatune.scan(model, max_dim=MAX_DIM, cache=tmp, progress=False))
                for _ in range(repeats)]
        if [(e.name, e.kappa) for e in warm[-1].out] != [(e.name, e.kappa) for e in cold.out]:
            raise SystemExit(f"[{label}] warm-cache table differs from the cold one")
        digest = [Timing(lambda: [kappatune.cache.tensor_digest(w) for _, w in tensors]) for _ in range(repeats)]
    log(f"[{label}] cache cold {cold.wall:.2f}s, warm {med([t.wall for t in warm]):.3f}s, "
        f"digest only {med([t.wall for t in digest]):.3f}s")

    shapes = {n: tuple(w.shape) for n, w in tensors}
    by_kind: Dict[str, List[int]] = {}
    for n, k in k64.items():
        c = by_kind.setdefault(module_kind(n) or "?", [0, 0])
        c[gram_criterion_fallback(shapes[n], k)] += 1

    rows = []
    for m, th, _ in methods:
        key = (m, th)
        r = dict(method=m, threads=th, wall_median_s=med(wall[key]), wall_min_s=min(wall[key]),
                 cpu_median_s=med(cpu[key]), wall_s=wall[key], cpu_s=cpu[key],
                 vs_reference=med(wall[(REF, th)]) / med(wall[key]),
                 vs_peft=med(wall[(PEFT, th)]) / med(wall[key]),
                 over_floor=med(wall[key]) / med(wall[(FLOOR, th)]))
        if m != FLOOR:
            r.update(max_rel_diff=max_rel_diff(kappas[key], k64), ranking_identical=ranking(kappas[key]) == ranking(k64),
                     rank_positions_moved=rank_moves(kappas[key], k64))
        rows.append(r)
    k_vals = sorted(k64.values())
    ours_default = med(wall[(OURS, default_threads)])
    return dict(
        model=label, tensors=len(tensors), weights=n_params, repeats=repeats, default_threads=default_threads,
        float64_reference_s=t64_wall, kappa_min=k_vals[0], kappa_median=med(k_vals), kappa_max=k_vals[-1],
        methods=rows,
        cache=dict(cold_wall_s=cold.wall, cold_cpu_s=cold.cpu,
                   warm_wall_s=[t.wall for t in warm], warm_cpu_s=[t.cpu for t in warm],
                   warm_wall_median_s=med([t.wall for t in warm]),
                   warm_over_cold_wall=med([t.wall for t in warm]) / cold.wall,
                   digest_wall_median_s=med([t.wall for t in digest]), kappa_wall_median_s=ours_default),
        paths=dict(qr_matrices=paths_per_run[-1]["qr"], svd_matrices=paths_per_run[-1]["svd"],
                   gram_matrices=len(tensors) - paths_per_run[-1]["qr"] - paths_per_run[-1]["svd"],
                   per_run=paths_per_run,
                   seconds_median={th: {k: med([d[k] for d in path_seconds[th]]) for k in ("qr", "svd")}
                                   for th in settings},
                   by_kind_gram_or_not=by_kind),
    )


def markdown(res: dict) -> str:
    d = res["default_threads"]
    lines = [
        f"**{res['model']}** — {res['tensors']} tensors, {res['weights'] / 1e6:.1f}M weights, "
        f"κ from {res['kappa_min']:.3g} to {res['kappa_max']:.3g} (median {res['kappa_median']:.3g}); "
        f"median of {res['repeats']} runs, methods interleaved",
        "",
        "| method | threads | wall s (median) | wall s (min) | CPU s | vs reference | vs PEFT | ÷ floor | "
        "max rel. κ diff vs float64 | ranking = float64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in res["methods"]:
        if "ranking_identical" in r:
            same = "yes" if r["ranking_identical"] else f"no ({r['rank_positions_moved']} positions differ)"
            diff = f"{r['max_rel_diff']:.1e}"
        else:
            same, diff = "", ""
        strong = r["method"] == OURS
        name = f"**{r['method']}**" if strong else r["method"]
        lines.append(f"| {name} | {r['threads']} | {fmt_s(r['wall_median_s'])} | {fmt_s(r['wall_min_s'])} | "
                     f"{fmt_s(r['cpu_median_s'])} | {r['vs_reference']:.2f}× | {r['vs_peft']:.2f}× | "
                     f"{r['over_floor']:.2f}× | {diff} | {same} |")
    c, p = res["cache"], res["paths"]
    kinds = ", ".join(f"{k} {g}/{g + x}" for k, (g, x) in sorted(p["by_kind_gram_or_not"].items()))
    sec = p["seconds_median"]
    lines += [
        "",
        "`vs reference` / `vs PEFT`: that method's median wall time ÷ this row's, at the same thread count "
        "(> 1: this row is faster). `÷ floor`: this row ÷ the floor at the same thread count. At "
        f"{d} threads kappatune runs {d} tensors at once (1 BLAS thread each), and so does the floor.",
        "",
        f"- kappatune's methods: {p['gram_matrices']} matrices from the Gram matrix, {p['qr_matrices']} on the QR "
        f"path, {p['svd_matrices']} on the SVD last resort; time in the QR path "
        + ", ".join(f"{fmt_s(sec[th]['qr'])} s at {th} thread(s)" for th in sec)
        + f"; Gram criterion met per kind (float64 κ): {kinds}",
        f"- cache ({d} threads): cold {fmt_s(c['cold_wall_s'])} s, warm {fmt_s(c['warm_wall_median_s'])} s "
        f"(**{fmt_pct(c['warm_over_cold_wall'])}** of cold); digest alone {fmt_s(c['digest_wall_median_s'])} s",
        f"- float64 numpy SVD reference (untimed, for the κ errors): {res['float64_reference_s']:.1f} s",
    ]
    return "\n".join(lines)


def closing_note(results: List[dict]) -> str:
    """Which goals are met (✗: missed), per model and thread count."""
    out = ["### Goals", "", "| model | threads | vs reference (goal ≥ 5×) | vs PEFT (goal ≥ 2.5×) | "
           "÷ floor (goal ≤ 1.5×) | max rel. κ error (goal ≤ 1e-6) | ranking identical |",
           "|---|---:|---:|---:|---:|---:|:---:|"]

    def mark(good: bool, text: str) -> str:
        return text if good else text + " ✗"

    for res in results:
        for r in res.get("methods", []):
            if r["method"] != OURS:
                continue
            ref = mark(r["vs_reference"] >= 5, f"{r['vs_reference']:.2f}×")
            pft = mark(r["vs_peft"] >= 2.5, f"{r['vs_peft']:.2f}×")
            flo = mark(r["over_floor"] <= 1.5, f"{r['over_floor']:.2f}×")
            err = mark(r["max_rel_diff"] <= 1e-6, f"{r['max_rel_diff']:.1e}")
            rank = "yes" if r["ranking_identical"] else "no ✗"
            out.append(f"| {res['model']} | {r['threads']} | {ref} | {pft} | {flo} | {err} | {rank} |")
    out += ["", "Where kappatune's time goes (medians; the floor is the float64 upcast + Gram product of every "
            "tensor, which every float64 method here pays; the rest is the dense eigen-decomposition of the Gram "
            "matrices, LAPACK dsyevd, plus overheads):", ""]
    for res in results:
        for r in res.get("methods", []):
            if r["method"] != OURS:
                continue
            th = r["threads"]
            fl = next(x for x in res["methods"] if x["method"] == FLOOR and x["threads"] == th)["wall_median_s"]
            sec = res["paths"]["seconds_median"]
            sec = sec.get(th, sec.get(str(th), {"qr": 0.0, "svd": 0.0}))
            rest = r["wall_median_s"] - fl - sec["qr"] - sec["svd"]
            out.append(f"- {res['model']}, {th} thread(s): {fmt_s(r['wall_median_s'])} s = floor {fmt_s(fl)} s "
                       f"+ QR path {fmt_s(sec['qr'])} s ({res['paths']['qr_matrices']} matrices) + SVD "
                       f"{fmt_s(sec['svd'])} s ({res['paths']['svd_matrices']}) + the rest {fmt_s(rest)} s")
    return "\n".join(out)


def page_title(results: List[dict]) -> str:
    """The results page's heading, naming the model when the run measured one."""
    models = [r["model"].split(" (")[0].split(",")[0] for r in results if "methods" in r]
    return "Scan speed and exactness" + (f": {models[0]}" if len(models) == 1 else "")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the TinyLlama-shape model (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported (default 3)")
    ap.add_argument("--skip-real", action="store_true", help="skip the real SmolLM2-135M")
    ap.add_argument("--only", choices=["tinyllama", "smollm2"], help="benchmark one model only")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="the default thread count (default: os.cpu_count()); every method also runs at 1")
    ap.add_argument("--no-peft", action="store_true",
                    help="skip the comparison with PEFT's find_kappa_target_modules (run when peft is installed)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/scan_speed)")
    ap.add_argument("--note", default="", help="a caveat printed under the machine line of results.md")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--k64-cache", type=Path, metavar="JSON",
                    help="keep the (untimed) float64 reference κ in this file and reuse it for the same tensors")
    ap.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                    help="measure nothing: rebuild results.md (next to it) from a results.json this script wrote")
    args = ap.parse_args(argv)
    if args.render:
        import json

        doc = json.loads(args.render.read_text())
        results = doc["results"]["results"]
        sections = [markdown(r) for r in results if "methods" in r]
        note = closing_note(results)
        info = doc["machine"]
        write_results("scan_speed", doc["results"], "\n\n".join(sections + [note]), title=page_title(results),
                      command=doc["command"], info=info, notes=args.note, out_dir=args.render.parent)
        return 0
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

    print(f"# kappatune scan speed (torch {torch.__version__}, 1 and {args.threads} threads, "
          f"{os.cpu_count()} CPUs, max_dim={MAX_DIM})\n")
    results: List[dict] = []
    sections: List[str] = []
    if args.only in (None, "tinyllama"):
        model = build_tinyllama(args.layers)
        results.append(bench_model(f"TinyLlama-1.1B shapes, {args.layers} layer(s), random init", model,
                                   args.repeats, args.threads, log, args.k64_cache))
        del model
        sections.append(markdown(results[-1]))
        print(sections[-1] + "\n", flush=True)
    if args.only == "smollm2" or (args.only is None and not args.skip_real):
        model = load_smollm2()
        results.append(bench_model("SmolLM2-135M (pretrained, dequantized Q4_1)", model, args.repeats,
                                   args.threads, log, args.k64_cache))
        sections.append(markdown(results[-1]))
        print(sections[-1] + "\n", flush=True)
        if not args.no_peft:
            try:
                import peft  # noqa: F401
            except ImportError:
                log("peft is not installed: skipping the find_kappa_target_modules comparison")
            else:
                from peft_compare import compare

                data: dict = {}
                report = compare(model, top_p=0.2, repeats=args.repeats, log=log, data=data)
                results[-1]["peft_find_kappa_target_modules"] = data
                sections.append(f"### SmolLM2-135M: PEFT's `find_kappa_target_modules` vs kappatune's "
                                f"({args.threads} threads)\n\n" + report)
                print(sections[-1] + "\n", flush=True)
        del model
    note = closing_note(results)
    print(note)
    info = machine_info(threads=args.threads)
    body = "\n\n".join(sections + [note])
    folder = write_results("scan_speed", dict(results=results), body, title=page_title(results),
                           info=info, notes=args.note, out_dir=args.out)
    log(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
