#!/usr/bin/env python
"""Large models: one Llama-3-8B-shaped layer timed, and the CLI on a full TinyLlama-1.1B checkpoint.

**Llama-3-8B layer** (``--llama8b``): the seven weight matrices of one decoder layer of a
``LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
num_key_value_heads=8)`` — q, o 4096×4096; k, v 1024×4096; gate, up 14336×4096; down 4096×14336 —
random init (normal, std 0.02, seed 0), stored in bf16. Timed: ``kappatune.scan`` of the layer's
state dict at 1 thread (``num_workers=1``) and at the default threads, and the reference
(``torch.linalg.svd(W.float(), full_matrices=False)``, the original kappaTune code) and PEFT's
``torch.linalg.svdvals(W.float())`` once per distinct shape at the default threads, summed with
multiplicity to a per-layer cost. The full model (32 such layers; the 128256-row embedding and
lm_head are skipped by ``max_dim=16384`` in every method) is extrapolated as 32 × the layer.
κ of k and v is checked against the float64 SVD.

**TinyLlama-1.1B checkpoint** (``--tinyllama``): ``LlamaForCausalLM`` from the TinyLlama-1.1B config
(hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000), random init, cast
to bf16 and written as one safetensors file (~2.2 GB) under ``benchmarks/results/tmp/`` (git-ignored,
deleted afterwards); then ``kappatune scan <folder> --no-cache`` (the CLI, a fresh process) with
its peak resident memory (``getrusage`` of the child, as ``benchmarks/cli_memory.py``), and the
same for a 2-layer checkpoint of the same shapes: the peak does not grow with the model.

Writes ``benchmarks/results/scan_large/results.json`` and ``results.md``.

Run (from the repository root)::

    python benchmarks/scan_large.py                    # both parts
    python benchmarks/scan_large.py --llama8b          # the Llama-3-8B layer only
"""

from __future__ import annotations

import argparse
import math
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import kappatune  # noqa: E402
from results_io import machine_info, write_results  # noqa: E402

MAX_DIM = 16384
TMP = ROOT / "benchmarks" / "results" / "tmp"


def llama8b_layer(seed: int = 0) -> Dict[str, torch.Tensor]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, vocab_size=128256)
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.0.{k}.weight": (torch.randn(s, generator=g) * cfg.initializer_range).to(torch.bfloat16)
            for k, s in shapes.items()}


def timed(fn) -> Tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_llama8b(default_threads: int, repeats: int, log, with_peft: bool = True) -> Tuple[dict, str]:
    sd = llama8b_layer()
    n = sum(v.numel() for v in sd.values())
    log(f"Llama-3-8B layer: {len(sd)} matrices, {n / 1e6:.0f}M weights (bf16)")
    ours: Dict[int, List[float]] = {1: [], default_threads: []}
    table = None
    for r in range(repeats):
        for th in ours:
            torch.set_num_threads(th)
            with threadpool_limits(limits=th, user_api="blas"):
                t, table = timed(lambda: kappatune.scan(sd, cache=None, progress=False, max_dim=MAX_DIM,
                                                        num_workers=1 if th == 1 else None))
            ours[th].append(t)
            log(f"  kappatune @ {th} thread(s): {t:.1f} s")
    torch.set_num_threads(default_threads)
    kap = {e.name: e.kappa for e in table}  # type: ignore[union-attr]
    by_shape: Dict[Tuple[int, int], List[str]] = {}
    for k, v in sd.items():
        by_shape.setdefault(tuple(v.shape), []).append(k)
    ref_s, peft_s = {}, {}
    with threadpool_limits(limits=default_threads, user_api="blas"):
        for shape, names in by_shape.items():
            w = sd[names[0]]
            ref_s[shape], _ = timed(lambda: torch.linalg.svd(w.float(), full_matrices=False))
            peft_s[shape] = timed(lambda: torch.linalg.svdvals(w.float()))[0] if with_peft else math.nan
            log(f"  {shape}: reference {ref_s[shape]:.1f} s, PEFT svdvals {peft_s[shape]:.1f} s (×{len(names)})")
    errs = {}
    for k in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        s = np.linalg.svd(sd[k].double().numpy(), compute_uv=False)
        errs[k] = abs(kap[k] - s[0] / s[-1]) / (s[0] / s[-1])
    ref_layer = sum(ref_s[s] * len(v) for s, v in by_shape.items())
    peft_layer = sum(peft_s[s] * len(v) for s, v in by_shape.items())
    med = {th: statistics.median(v) for th, v in ours.items()}
    data = dict(matrices=len(sd), weights=n, kappatune_s=ours, kappatune_median_s=med,
                reference_per_shape_s={str(k): v for k, v in ref_s.items()},
                peft_per_shape_s={str(k): v for k, v in peft_s.items()},
                reference_layer_s=ref_layer, peft_layer_s=peft_layer, kappa=kap, kappa_rel_err_kv=errs,
                layers_full_model=32)
    md = [f"**One Llama-3-8B-shaped layer** (hidden 4096, intermediate 14336, 8 kv heads; 7 matrices, "
          f"{n / 1e6:.0f}M weights, bf16, random init), median of {repeats}:", "",
          "| method | threads | one layer, s | full model (32 layers), extrapolated | vs reference |",
          "|---|---:|---:|---:|---:|",
          f"| reference: torch.linalg.svd fp32 (per distinct shape × multiplicity) | {default_threads} | "
          f"{ref_layer:.1f} | {32 * ref_layer / 60:.1f} min | 1.00× |"]
    if with_peft:
        md.append(f"| PEFT: torch.linalg.svdvals fp32 (same) | {default_threads} | {peft_layer:.1f} | "
                  f"{32 * peft_layer / 60:.1f} min | {ref_layer / peft_layer:.2f}× |")
    for th in ours:
        md.append(f"| **kappatune.scan** | {th} | {med[th]:.1f} | {32 * med[th] / 60:.1f} min | "
                  f"{ref_layer / med[th]:.2f}× |")
    md += ["", "Reference and PEFT: one run per distinct shape (4096×4096, 1024×4096, 14336×4096, 4096×14336) at "
           f"{default_threads} threads, multiplied by how often the shape occurs in a layer. "
           f"κ of k_proj / v_proj vs float64 SVD: max relative error {max(errs.values()):.1e}. "
           "The embedding and lm_head (128256 × 4096) are outside `max_dim=16384` for every method."]
    return data, "\n".join(md)


def write_tinyllama(folder: Path, layers: int) -> int:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    del model, sd
    return (folder / "model.safetensors").stat().st_size


def bench_tinyllama(default_threads: int, log) -> Tuple[dict, str]:
    from cli_memory import measure

    rows = []
    for layers in (2, 22):
        folder = TMP / f"tinyllama-{layers}"
        try:
            size = write_tinyllama(folder, layers)
            log(f"TinyLlama checkpoint, {layers} layers: {size / 2 ** 30:.2f} GiB written")
            out_json = TMP / f"tinyllama-{layers}.json"
            cmd = [sys.executable, "-m", "kappatune", "scan", str(folder), "--no-cache", "--no-progress",
                   "--top", "0", "-o", str(out_json)]
            res = measure(cmd, default_threads)
            summary = json.loads(out_json.read_text())["summary"]
            n_tensors = summary["analysed"]
            rows.append(dict(layers=layers, checkpoint_bytes=size, peak_rss_bytes=res["peak"], wall_s=res["wall"],
                             tensors=n_tensors, scan_seconds=summary["seconds"]))
            log(f"  kappatune scan: {res['wall']:.1f} s ({summary['seconds']:.1f} s scanning), peak RSS {res['peak'] / 2 ** 20:.0f} MiB, {n_tensors} tensors")
            out_json.unlink()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    md = [f"**`kappatune scan` (the CLI) on TinyLlama-1.1B-shaped bf16 checkpoints** (random init, "
          f"OMP_NUM_THREADS={default_threads}, no cache, every tensor including embeddings and lm_head):", "",
          "| layers | checkpoint | tensors analysed | scan s (CLI's own figure) | process wall s | peak RSS |",
          "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['layers']} | {r['checkpoint_bytes'] / 2 ** 30:.2f} GiB | {r['tensors']} | {r['scan_seconds']:.1f} | "
                  f"{r['wall_s']:.1f} | {r['peak_rss_bytes'] / 2 ** 20:.0f} MiB |")
    if len(rows) == 2:
        md += ["", f"Peak memory at 22 layers ÷ at 2 layers: {rows[1]['peak_rss_bytes'] / rows[0]['peak_rss_bytes']:.2f} "
               f"(checkpoint {rows[1]['checkpoint_bytes'] / rows[0]['checkpoint_bytes']:.1f}× larger); the wall time "
               "includes starting Python and importing torch. The checkpoints were deleted afterwards."]
    return dict(rows=rows), "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama8b", action="store_true", help="the Llama-3-8B layer only (default: both parts)")
    ap.add_argument("--tinyllama", action="store_true", help="the TinyLlama CLI checkpoint only")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="default threads (default: os.cpu_count())")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's svdvals rows of the Llama-3-8B layer")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/scan_large)")
    ap.add_argument("--note", default="", help="a caveat printed under the machine line of results.md")
    args = ap.parse_args(argv)
    both = not (args.llama8b or args.tinyllama)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data, parts = {}, []
    if both or args.llama8b:
        data["llama3_8b_layer"], md = bench_llama8b(args.threads, args.repeats, log, not args.no_peft)
        parts.append(md)
        print(md + "\n", flush=True)
    if both or args.tinyllama:
        data["tinyllama_cli"], md = bench_tinyllama(args.threads, log)
        parts.append(md)
        print(md + "\n", flush=True)
    title = ("Large models: Llama-3-8B layer, TinyLlama-1.1B CLI scan" if both else
             "Large models: one Llama-3-8B layer" if args.llama8b else
             "Large models: the CLI on a TinyLlama-1.1B checkpoint")
    folder = write_results("scan_large", data, "\n\n".join(parts), title=title,
                           info=machine_info(threads=args.threads), notes=args.note, out_dir=args.out)
    log(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
