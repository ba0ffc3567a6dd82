#!/usr/bin/env python
"""The cost of each of kappatune's κ methods on one matrix, and where kappa.py switches between them.

For every shape, one float32 matrix (seed 0) of each spectrum kind, upcast to float64 once
(not timed), and per method the median wall time of ``--repeats`` runs (1 thread unless
``--threads``):

* ``gram``: the short-side Gram product alone (numpy ``x @ x.T``, BLAS dsyrk) — the floor of
  every float64 method here;
* ``cholesky``: one Cholesky factorisation of that Gram matrix (``torch.linalg.cholesky_ex``);
* ``dense numpy`` / ``dense torch``: all eigenvalues of the Gram matrix (LAPACK dsyevd through
  numpy's OpenBLAS / torch's MKL);
* ``certified``: kappa.py's certified extremes (block Lanczos on G and on G⁻¹ through the
  Cholesky factor, Sylvester-inertia certificates by two more Cholesky factorisations),
  ``kappatune.kappa._certified_gram_extremes``; the Lanczos basis size it needed is shown;
* ``qr``: kappa.py's QR path (R of the QR factorisation, H = (RᵀR)⁻¹, Lanczos on H and its
  certificate), ``kappatune.kappa._qr_extremes``;
* ``svd``: the values-only float64 SVD (numpy dgesdd), the last resort.

Spectra: ``gaussian`` (random init: Marchenko–Pastur, clustered at both ends — the hard case
for Lanczos), ``trained`` (singular values decaying like a trained projection's,
σ_i = 1/(1 + 5·i/k)² plus a few outliers at the top, κ ≈ 36).

Run (from the repository root)::

    python benchmarks/kappa_paths.py                         # writes benchmarks/results/kappa_paths/
    python benchmarks/kappa_paths.py --shapes 576x1536 2048x2048 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

if __name__ == "__main__":  # numpy's OpenBLAS fixes its thread count at import: match --threads
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--threads", type=int, default=1)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_pre.parse_known_args()[0].threads))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results_io import machine_info, write_results  # noqa: E402

from kappatune import kappa as K  # noqa: E402

DEFAULT_SHAPES = ["192x576", "576x576", "576x1536", "1024x1024", "2048x2048", "2048x5632"]


def matrix(m: int, n: int, kind: str) -> torch.Tensor:
    rng = np.random.default_rng(0)
    if kind == "gaussian":
        return torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32)).double()
    k = min(m, n)
    s = 1.0 / (1.0 + 5.0 * np.arange(k) / k) ** 2
    s[:4] *= np.array([3.0, 2.2, 1.7, 1.3])
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy(((u * s) @ v.T).astype(np.float32)).double()


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def basis_used(fn: Callable[[], object]) -> List[int]:
    sizes: List[int] = []
    orig = K._krylov_max

    def wrapped(apply, b, n, like, tol=None):
        calls = []

        def counting(x):
            calls.append(x.shape[-2])
            return apply(x)

        out = orig(counting, b, n, like, tol)
        sizes.append(sum(calls))
        return out

    K._krylov_max = wrapped
    try:
        fn()
    finally:
        K._krylov_max = orig
    return sizes


def bench(shape: str, kind: str, repeats: int) -> Dict[str, object]:
    m, n = (int(x) for x in shape.split("x"))
    a = matrix(m, n, kind)[None]
    g = K._gram(a)
    gt = torch.from_numpy(g.numpy().copy())
    lmin_d, lmax_d = (float(x) for x in K._dense_gram_extremes(g))
    row: Dict[str, object] = dict(shape=shape, kind=kind, kappa=(lmax_d / lmin_d) ** 0.5)
    row["gram"] = timed(lambda: K._gram(a), repeats)
    row["cholesky"] = timed(lambda: torch.linalg.cholesky_ex(gt), repeats)
    row["dense numpy"] = timed(lambda: np.linalg.eigvalsh(g.numpy()), repeats)
    row["dense torch"] = timed(lambda: torch.linalg.eigvalsh(gt), repeats)
    row["certified"] = timed(lambda: K._certified_gram_extremes(g, m, n), repeats)
    lmin, lmax, ok, dense = K._certified_gram_extremes(g, m, n)
    row["certified_ok"] = bool(ok[0])
    row["certified_needs_dense"] = bool(dense[0])
    row["lanczos_basis"] = basis_used(lambda: K._certified_gram_extremes(g, m, n))
    row["qr"] = timed(lambda: K._qr_extremes(a, torch.tensor([lmax_d], dtype=torch.float64)), repeats)
    row["svd"] = timed(lambda: np.linalg.svd(a[0].numpy(), compute_uv=False), max(1, repeats // 2))
    return row


METHODS = ["gram", "cholesky", "dense numpy", "dense torch", "certified", "qr", "svd"]


def markdown(rows: List[Dict[str, object]]) -> str:
    head = "| shape | spectrum | κ | " + " | ".join(f"{m} ms" for m in METHODS) + \
        " | certified ÷ best dense | Lanczos basis (G, G⁻¹) | certified result |"
    lines = [head, "|" + "---|" * (len(METHODS) + 6)]
    for r in rows:
        best_dense = min(r["dense numpy"], r["dense torch"])  # type: ignore[type-var]
        cert = "certified" if r["certified_ok"] else ("→ dense" if r["certified_needs_dense"] else "→ QR path")
        lines.append(f"| {r['shape']} | {r['kind']} | {r['kappa']:.3g} | " +
                     " | ".join(f"{1e3 * r[m]:.2f}" for m in METHODS) +  # type: ignore[operator]
                     f" | {r['certified'] / best_dense:.2f}× | {', '.join(map(str, r['lanczos_basis']))} | {cert} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="m x n shapes (default: %(default)s)")
    ap.add_argument("--kinds", nargs="+", default=["gaussian", "trained"], choices=["gaussian", "trained"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/kappa_paths)")
    ap.add_argument("--note", default="", help="a caveat printed under the machine line of results.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        for kind in args.kinds:
            rows.append(bench(shape, kind, args.repeats))
            r = rows[-1]
            print(f"{shape} {kind}: " + ", ".join(f"{m} {1e3 * r[m]:.1f}" for m in METHODS)  # type: ignore[operator]
                  + f" ms; basis {r['lanczos_basis']}", flush=True)
    md = markdown(rows)
    print(md)
    info = machine_info(threads=args.threads)
    body = (md + "\n\nMedian of " + str(args.repeats) + " runs per cell (the SVD: half as many). "
            "`certified` includes its own Cholesky factorisations (three) and the Lanczos iterations; "
            "it does not include the Gram product.\n")
    folder = write_results("kappa_paths", dict(rows=rows, repeats=args.repeats), body,
                           title="κ methods: cost per matrix and the switch points", info=info,
                           notes=args.note, out_dir=args.out)
    print(f"wrote {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
