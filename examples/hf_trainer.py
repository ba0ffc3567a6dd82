"""KappaTuneOptimizer with the Hugging Face ``Trainer``: SmolLM2-135M on King James Bible text, offline.

Same model and data as ``examples/quickstart.py``, trained by ``transformers.Trainer`` (which also
makes the LR schedule and drives accelerate). Two ways in, chosen with ``--route``:

* ``optimizers`` (default): build the optimizer yourself and pass
  ``Trainer(..., optimizers=(KappaTuneOptimizer(model, ...), None))``;
* ``factory``: ``optimizer_cls_and_kwargs=kappatune.integrations.transformers.optimizer_cls_and_kwargs(
  model, ...)`` — selects and freezes now, and the Trainer builds the optimizer itself (the route
  the Trainer still allows under FSDP / DeepSpeed).

Prints the selection, the training loss, the held-out loss before and after, and the trainable
fraction. With ``--output-dir`` checkpoints are kept (every ``--save-steps``) and
``--resume`` continues from the last one with the same selection and optimizer state.

Run (from anywhere)::

    python examples/hf_trainer.py
    python examples/hf_trainer.py --route factory --steps 12
    python examples/hf_trainer.py --output-dir runs/kjv --steps 8 && \\
        python examples/hf_trainer.py --output-dir runs/kjv --steps 12 --resume
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import offline  # noqa: E402

import kappatune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--route", choices=["optimizers", "factory"], default="optimizers")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-fraction", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--output-dir", help="keep checkpoints here (default: a temporary folder, no checkpoints)")
    ap.add_argument("--save-steps", type=int, default=4)
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    ap.add_argument("--cache-dir", default=str(REPO / "cache"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else (os.cpu_count() or 1))
    args = ap.parse_args()
    if args.resume and not args.output_dir:
        ap.error("--resume needs --output-dir")

    torch.set_num_threads(args.threads)
    import datasets
    import transformers

    model, tok = offline.load_smollm2(torch.float32)
    # transformers leaves its GGUF loader attached as ``hf_quantizer``, and the Trainer refuses
    # "purely quantized models"; the weights are plain float32 after dequantization, so detach it.
    model.hf_quantizer, model.is_quantized = None, False
    train_texts, held_texts = offline.split(offline.kjv_verses(), held_out=0.1, seed=0)
    random.Random(0).shuffle(train_texts)  # as in quickstart.py: sample the whole Bible
    random.Random(1).shuffle(held_texts)
    train = offline.token_windows(tok, train_texts, args.seq_len, max_windows=args.steps * args.batch)
    held = offline.token_windows(tok, held_texts, args.seq_len, max_windows=args.held_out)
    to_ds = lambda w: datasets.Dataset.from_dict({"input_ids": w.tolist(), "labels": w.tolist()})  # noqa: E731

    select = dict(top_fraction=args.top_fraction, max_dim=16384, cache=args.cache_dir)
    hyper = dict(lr=args.lr, weight_decay=0.01)
    if args.route == "optimizers":
        opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, **select, **hyper)
        trainer_opt = dict(optimizers=(opt, None))
        selected, kappas = opt.selected, opt.table
    else:
        from kappatune.integrations.transformers import optimizer_cls_and_kwargs

        cls, kwargs = optimizer_cls_and_kwargs(model, torch.optim.AdamW, **select, **hyper)
        trainer_opt = dict(optimizer_cls_and_kwargs=(cls, kwargs))
        selected, kappas = kwargs["names"], kwargs["table"]
    print(f"selected {len(selected)} tensors (lowest κ first):")
    for n in selected:
        print(f"  κ={kappas[n].kappa:8.3f}  {n}")

    tmp = None if args.output_dir else tempfile.TemporaryDirectory()
    out = args.output_dir or tmp.name
    targs = transformers.TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10), logging_steps=2, report_to="none", use_cpu=True, seed=0,
        save_strategy="steps" if args.output_dir else "no", save_steps=args.save_steps, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=to_ds(train), eval_dataset=to_ds(held),
                                   **trainer_opt)
    before = trainer.evaluate()["eval_loss"]
    resume = None
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(out)
        if resume is None:
            ap.error(f"no checkpoint in {out} to resume from")
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()["eval_loss"]

    opt = trainer.optimizer
    while not isinstance(opt, kappatune.KappaTuneOptimizer):  # accelerate wraps it
        opt = opt.optimizer
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    print("\ntraining loss: " + ", ".join(f"step {s}: {v:.3f}" for s, v in losses))
    print(f"held-out KJV loss (pretrained -> trained): {before:.3f} -> {after:.3f}")
    print(f"learning rate at the end (scheduled by the Trainer): {opt.param_groups[0]['lr']:.3g}")
    print(opt.summary())
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
