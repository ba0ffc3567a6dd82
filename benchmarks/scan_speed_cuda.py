#!/usr/bin/env python
"""The CUDA row of the scan benchmark: TinyLlama-1.1B shapes built on the GPU, every method on the GPU.

A ``LlamaForCausalLM`` from the TinyLlama-1.1B config (hidden 2048, intermediate 5632, 32 heads,
4 kv heads, vocab 32000; ``--layers`` layers, random init, seed 0) is built directly on the GPU.
On its 2-D weights (``max_dim=16384``: embeddings and lm_head skipped), timed on the same GPU,
interleaved repeat by repeat, with ``torch.cuda.synchronize()`` around each call:

* **reference** — ``torch.linalg.svd(W.float(), full_matrices=False)`` per tensor (the original kappaTune);
* **PEFT** — ``torch.linalg.svdvals(W.float())`` per tensor;
* **kappatune** — ``kappatune.scan(model, cache=None, progress=False, max_dim=16384)`` (float64 on the
  GPU: the certified extremes, kappa.py's default off the CPU);
* **kappatune, dense** — the same with the dense eigen-decomposition (``eigvalsh``) instead of
  the certified extremes (``kappatune.kappa._use_certified`` patched to ``False``), to check the
  default on this GPU;
* **floor** — ``W.double()`` and its short-side Gram product, per tensor.

κ errors against a float64 SVD on the CPU (``numpy.linalg.svd``, untimed), ranking identity.
Writes ``results.json`` / ``results.md`` to ``--out`` (default ``benchmarks/results/scan_speed_cuda``).

Run on a CUDA machine (from the repository root)::

    python benchmarks/scan_speed_cuda.py --layers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import kappatune  # noqa: E402
from kappatune import kappa as K  # noqa: E402
from results_io import machine_info, write_results  # noqa: E402

MAX_DIM = 16384


def build(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).eval()


def sync_timed(fn: Callable[[], object]) -> Tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do", file=sys.stderr)
        return 2
    model = build(args.layers)
    tensors = [(n, p.detach()) for n, p in model.named_parameters() if p.ndim == 2 and max(p.shape) <= MAX_DIM]

    def reference() -> Dict[str, float]:
        out = {}
        for n, w in tensors:
            _, s, _ = torch.linalg.svd(w.float(), full_matrices=False)
            out[n] = (s[0] / s[-1]).item()
        return out

    def peft() -> Dict[str, float]:
        return {n: (lambda s: (s[0] / s[-1]).item())(torch.linalg.svdvals(w.float())) for n, w in tensors}

    def ours() -> Dict[str, float]:
        return {e.name: e.kappa for e in kappatune.scan(model, cache=None, progress=False, max_dim=MAX_DIM)}

    def ours_dense() -> Dict[str, float]:
        real = K._use_certified
        K._use_certified = lambda g: False
        try:
            return ours()
        finally:
            K._use_certified = real

    def floor() -> Dict[str, float]:
        out = {}
        for n, w in tensors:
            x = w.double()
            g = x @ x.mT if x.shape[0] <= x.shape[1] else x.mT @ x
            out[n] = float(g[0, 0])
        return out

    methods = {"reference: torch.linalg.svd fp32": reference, "PEFT: torch.linalg.svdvals fp32": peft,
               "kappatune.scan (certified extremes, default)": ours, "kappatune.scan, dense eigvalsh": ours_dense,
               "floor: float64 upcast + Gram product": floor}
    for fn in methods.values():  # warm-up: CUDA context, cuSOLVER handles, kernels
        fn()
    times: Dict[str, List[float]] = {m: [] for m in methods}
    kappas: Dict[str, Dict[str, float]] = {}
    names = list(methods)
    for r in range(args.repeats):
        for m in names[r % len(names):] + names[:r % len(names)]:
            t, out = sync_timed(methods[m])
            times[m].append(t)
            kappas[m] = out  # type: ignore[assignment]
            print(f"repeat {r + 1}: {m} {t:.3f} s", file=sys.stderr, flush=True)
    k64 = {}
    for n, w in tensors:
        s = np.linalg.svd(w.double().cpu().numpy(), compute_uv=False)
        k64[n] = float(s[0] / s[-1])
    rank64 = sorted(k64, key=lambda n: (k64[n], n))
    med = {m: statistics.median(v) for m, v in times.items()}
    ref = med["reference: torch.linalg.svd fp32"]
    pf = med["PEFT: torch.linalg.svdvals fp32"]
    fl = med["floor: float64 upcast + Gram product"]
    lines = [f"**TinyLlama-1.1B shapes, {args.layers} layer(s), built on {torch.cuda.get_device_name()}** — "
             f"{len(tensors)} tensors; median of {args.repeats} runs, methods interleaved, all on the GPU", "",
             "| method | wall s (median) | vs reference | vs PEFT | ÷ floor | max rel. κ diff vs float64 | ranking = float64 |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    rows = []
    for m in methods:
        row = dict(method=m, wall_s=times[m], wall_median_s=med[m], vs_reference=ref / med[m], vs_peft=pf / med[m],
                   over_floor=med[m] / fl)
        diff, same = "", ""
        if m in kappas and not m.startswith("floor"):
            k = kappas[m]
            row["max_rel_diff"] = max(abs(k[n] - k64[n]) / k64[n] for n in k64)
            row["ranking_identical"] = sorted(k, key=lambda n: (k[n], n)) == rank64
            diff, same = f"{row['max_rel_diff']:.1e}", "yes" if row["ranking_identical"] else "no"
        rows.append(row)
        lines.append(f"| {m} | {med[m]:.3f} | {ref / med[m]:.2f}× | {pf / med[m]:.2f}× | {med[m] / fl:.2f}× | "
                     f"{diff} | {same} |")
    md = "\n".join(lines)
    print(md)
    info = machine_info()
    info["gpu"] = torch.cuda.get_device_name()
    info["cuda"] = torch.version.cuda
    folder = write_results("scan_speed_cuda", dict(rows=rows, layers=args.layers, repeats=args.repeats,
                                                   gpu=info["gpu"]), md,
                           title="Scan speed on CUDA (TinyLlama-1.1B shapes)", info=info,
                           notes=f"GPU: {info['gpu']}, CUDA {info['cuda']}.", out_dir=args.out)
    print(f"wrote {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
