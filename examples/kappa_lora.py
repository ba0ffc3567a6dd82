"""κ-selected LoRA on a real pretrained model: SmolLM2-135M on the King James Bible, offline, on CPU.

kappatune scans every linear weight (exact κ, cached on disk), PEFT puts LoRA adapters on the
``--modules`` lowest-κ ones only, and a few AdamW steps train them on KJV verses. Prints the chosen
targets with their κ, the trainable-parameter count, and the held-out KJV loss before and after.

Run (from the repository root)::

    python examples/kappa_lora.py                     # 20 modules, rank 16, 8 steps
    python examples/kappa_lora.py --modules 10 --steps 20

Needs ``pip install kappatune[peft]`` plus the offline model and corpus (see ``examples/offline.py``).
SmolLM2 is shipped as a 4-bit GGUF, dequantized to float32 here: its κ values are those of the
dequantized matrices.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline  # noqa: E402

from kappatune.integrations.peft import get_kappatune_lora_model, kappa_lora_targets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", type=int, default=20, help="number of lowest-κ modules to adapt")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--steps", type=int, default=8, help="training steps")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--cache-dir", default=None, help="κ cache folder (default: kappatune's default cache)")
    args = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tok = offline.load_smollm2(torch.float32)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")

    train_txt, held_txt = offline.split(offline.kjv_verses(), held_out=0.05, seed=0)
    train = offline.token_windows(tok, train_txt, args.seq_len, max_windows=args.steps * args.batch)
    held = offline.token_windows(tok, held_txt, args.seq_len, max_windows=8)

    cache = True if args.cache_dir is None else args.cache_dir
    t0 = time.perf_counter()
    targets = kappa_lora_targets(model, cache=cache, show_progress=False)
    print(f"κ of {len(targets)} candidate modules in {time.perf_counter() - t0:.1f}s "
          "(κ of the dequantized GGUF weights; a second run reads them from the cache)")
    chosen = targets[: args.modules]
    print(f"\nLoRA targets: the {len(chosen)} lowest-κ modules, lowest first")
    for t in chosen:
        print(f"  {t.name:<40} κ = {t.kappa:8.3f}   {'x'.join(map(str, t.shape))}")
    print(f"  (highest κ of all candidates: {targets[-1].name}, κ = {targets[-1].kappa:.4g})")

    before = offline.mean_loss(model, held, args.batch)
    # the model was just scanned into the cache: this second look-up reads κ from it
    model = get_kappatune_lora_model(model, num_modules_to_adapt=args.modules, lora_rank=args.rank,
                                     lora_alpha=2 * args.rank, lora_dropout=0.05, cache=cache,
                                     show_progress=False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"\ntrainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.3f}%)")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = train[step * args.batch:(step + 1) * args.batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"  step {step + 1:>3}/{args.steps}  train loss {loss.item():.3f}")
    dt = time.perf_counter() - t0
    after = offline.mean_loss(model, held, args.batch)
    print(f"\n{args.steps} steps in {dt:.1f}s ({dt / max(1, args.steps):.2f} s/step, "
          f"batch {args.batch}x{args.seq_len})")
    print(f"held-out KJV loss: {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
