"""Peak memory of ``kappatune scan`` on checkpoints on disk, against loading the state dict fully.

Each case runs in a fresh subprocess; its peak resident set size (RSS, which counts the
memory-mapped file pages a process has touched) is read from ``getrusage(RUSAGE_CHILDREN)`` by a
small wrapper process started for that case alone.

Cases, per checkpoint:

* ``python + torch``: ``import kappatune, safetensors`` and nothing else (the floor);
* ``kappatune scan (cold)``: the CLI, empty κ cache (reads, hashes and analyses every tensor);
* ``kappatune scan (warm)``: the CLI again, every κ from the cache (reads and hashes every tensor);
* ``full load + scan``: ``safetensors.torch.load_file`` of every shard into one state dict, then
  ``kappatune.scan(state_dict)`` (the baseline: what loading the weights first costs).

Checkpoints:

* ``synthetic N GB``: for each ``--size-gb`` N, N GB of float32 tensors ``(128, 131072)`` (64 MiB each) in 512 MiB shards
  with a ``model.safetensors.index.json``, plus the 1-D norms a model has (written here once);
* ``SmolLM2-135M``: the real model (``examples/offline.py``) saved with ``save_pretrained``
  (float32, 513 MiB); skipped when its package is missing or with ``--no-smollm2``.

Usage::

    python benchmarks/cli_memory.py                 # 1 GB and 4 GB synthetic + SmolLM2, 3 repeats
    python benchmarks/cli_memory.py --size-gb 2 --repeat 1 --no-smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
ROWS, COLS = 128, 131072  # 64 MiB of float32 per tensor; the Gram matrix is only 128 x 128


def _measure_child(cmd) -> None:
    """(run inside the wrapper) run cmd; print its peak RSS in bytes and wall time as JSON."""
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak *= 1 if platform.system() == "Darwin" else 1024  # Linux reports KiB
    print(json.dumps({"rc": rc, "peak": peak, "wall": wall}))


def measure(cmd, threads: int) -> dict:
    """Peak RSS (bytes) and wall time (s) of ``cmd`` run alone in a fresh wrapper process."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, __file__, "--_measure", "--", *map(str, cmd)],
                         capture_output=True, text=True, check=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"command failed ({res['rc']}): {' '.join(map(str, cmd))}")
    return res


def write_synthetic(folder: Path, size_gb: float) -> None:
    import torch
    from safetensors.torch import save_file

    n = max(1, round(size_gb * 1024 / 64))
    per_shard = 8
    shards = [list(range(i, min(n, i + per_shard))) for i in range(0, n, per_shard)]
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for s, idx in enumerate(shards, 1):
        fname = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in idx:
            tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(ROWS, COLS, generator=g)
            tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(COLS)
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_smollm2(folder: Path) -> bool:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import offline

        from transformers import AutoModelForCausalLM

        model, _ = offline.load_smollm2(with_tokenizer=False)
    except Exception as e:  # the model package is optional here
        print(f"SmolLM2 skipped: {e}", file=sys.stderr)
        return False
    # transformers refuses to save a model loaded from GGUF; the weights are plain float32 tensors by
    # now, so they go into a model built from the same config and that one is saved.
    plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(folder)
    return True


FULL_LOAD = """
import sys, kappatune
from kappatune.checkpoint import checkpoint_files
from safetensors.torch import load_file
sd = {}
for f in checkpoint_files(sys.argv[1]):
    sd.update(load_file(str(f)))
kappatune.scan(sd, cache=False, progress=False)
"""


def run(args) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = []
    synthetic = []
    for gb in args.size_gb:
        synth = work / f"synthetic_{gb:g}gb"
        if not (synth / "model.safetensors.index.json").exists():
            print(f"writing a {gb:g} GB synthetic checkpoint to {synth} ...", file=sys.stderr)
            write_synthetic(synth, gb)
        checkpoints.append((f"synthetic {gb:g} GB", synth))
        synthetic.append(synth)
    if args.smollm2:
        smol = work / "smollm2_135m"
        if (smol / "model.safetensors").exists() or write_smollm2(smol):
            checkpoints.append(("SmolLM2-135M", smol))

    py = sys.executable
    rows = []
    for label, ckpt in checkpoints:
        from kappatune.checkpoint import checkpoint_refs

        refs = checkpoint_refs(ckpt)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        largest = max((r for r in refs if r.floating and len(r.shape) >= 2), key=lambda r: math.prod(r.shape))
        one_f64 = math.prod(largest.shape) * 8
        cases = {
            "python + torch": lambda: [py, "-c", "import kappatune, safetensors"],
            "kappatune scan (cold)": None,
            "kappatune scan (warm)": None,
            "full load + scan": lambda: [py, "-c", FULL_LOAD, str(ckpt)],
        }
        results = {k: [] for k in cases}
        for rep in range(args.repeat):
            cache = Path(tempfile.mkdtemp(prefix="kappa_cache_", dir=work))
            scan = [py, "-m", "kappatune", "scan", str(ckpt), "--cache-dir", str(cache), "--no-progress", "--top", "0"]
            results["python + torch"].append(measure(cases["python + torch"](), args.threads))
            results["kappatune scan (cold)"].append(measure(scan, args.threads))
            results["kappatune scan (warm)"].append(measure(scan, args.threads))
            results["full load + scan"].append(measure(cases["full load + scan"](), args.threads))
            shutil.rmtree(cache, ignore_errors=True)
        full_peak = statistics.median(r["peak"] for r in results["full load + scan"])
        base = statistics.median(r["peak"] for r in results["python + torch"])
        for case, rs in results.items():
            peak = statistics.median(r["peak"] for r in rs)
            rows.append((label, size, f"{'x'.join(map(str, largest.shape))} {largest.dtype}", one_f64, case,
                         peak, peak - base, peak / full_peak, statistics.median(r["wall"] for r in rs)))

    print(f"\npeak RSS, median of {args.repeat} run(s); Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {args.threads or 'default'} thread(s) per process; ratio = peak / peak of 'full load + scan' on the same checkpoint\n")
    head = ("checkpoint", "size MiB", "largest tensor", "its f64 MiB", "case", "peak MiB", "over floor", "ratio",
            "wall s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, size, big, f64, case, peak, over, ratio, wall in rows:
        print(f"| {label} | {size / MiB:,.0f} | {big} | {f64 / MiB:,.0f} | {case} | {peak / MiB:,.0f} | "
              f"{over / MiB:+,.0f} | {ratio:.2f} | {wall:.1f} |")
    if not args.keep:
        for synth in synthetic:
            shutil.rmtree(synth, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_measure":
        _measure_child(sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, nargs="+", default=[1.0, 4.0],
                    help="sizes of the synthetic checkpoints in GB (default: 1 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (default 3; medians are reported)")
    ap.add_argument("--no-smollm2", dest="smollm2", action="store_false", help="skip the real SmolLM2-135M")
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "results" / "tmp"),
                    help="where checkpoints are written (default benchmarks/results/tmp, git-ignored)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP/MKL threads of the measured processes (default 1: steadier timings on a shared "
                         "machine; 0 leaves torch's default)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for the next run")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
