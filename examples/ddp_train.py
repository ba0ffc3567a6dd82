"""Multi-process fine-tuning with κ selection: DDP, FSDP1 or FSDP2 under ``torchrun``.

kappatune needs no launcher of its own. Under ``torchrun`` every rank runs this same script:

1. ``kappatune.scan(model)`` on the **bare** model: the κ computations are sharded over the ranks
   and every rank gets rank 0's identical table (only rank 0 writes the κ cache);
2. ``table.select(...)``: the same tensors on every rank (deterministic, ties by name);
3. freeze, then wrap (DDP / FSDP1 with ``use_orig_params=True`` / FSDP2 ``fully_shard``);
4. ``KappaTuneOptimizer(model, AdamW, names=names, table=table)``: no second scan, and a check
   that every rank trains the same tensors.

The backend is chosen automatically: NCCL when CUDA is available (one GPU per rank), gloo on CPU.
At the end every rank verifies that each frozen tensor is bit-for-bit what it was before training
and rank 0 verifies that the trained tensors are bit-for-bit the same on every rank.

Run (from the repository root)::

    torchrun --nproc_per_node 2 examples/ddp_train.py                        # tiny Llama, DDP, seconds
    torchrun --nproc_per_node 2 examples/ddp_train.py --strategy fsdp1       # FullyShardedDataParallel
    torchrun --nproc_per_node 2 examples/ddp_train.py --strategy fsdp2       # fully_shard
    torchrun --nproc_per_node 2 examples/ddp_train.py --smollm2 --steps 20   # real SmolLM2-135M on KJV text
    python examples/ddp_train.py                                             # one process, no process group

The default model is a tiny Llama built from a config (random init, synthetic token sequences with
a learnable pattern) so that it runs anywhere in seconds. ``--smollm2`` loads the real pretrained
SmolLM2-135M offline (see ``examples/offline.py``) and trains on King James Bible windows, each
rank on its own share.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kappatune  # noqa: E402
import kappatune.cache  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategy", choices=("ddp", "fsdp1", "fsdp2"), default="ddp")
    p.add_argument("--smollm2", action="store_true", help="the real pretrained SmolLM2-135M instead of a tiny Llama")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default 1e-2 (tiny) / 5e-5 (SmolLM2)")
    p.add_argument("--top-fraction", type=float, default=None,
                   help="train this fraction of the scanned tensors (default 0.25 tiny / 0.1 SmolLM2)")
    p.add_argument("--cache", default=None, help="κ cache folder (default: none, recompute)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    return p.parse_args()


def setup() -> tuple:
    """Initialise the process group when launched by torchrun (backend from the hardware)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def build_model(args: argparse.Namespace):
    if args.smollm2:
        import offline

        model, tok = offline.load_smollm2(torch.float32)
        return model, tok
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)                       # every rank builds the same initial weights
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg), None


def make_data(args: argparse.Namespace, tok, rank: int, world: int) -> torch.Tensor:
    """(N, seq_len) token windows of this rank's share."""
    n = args.steps * args.batch * world
    if args.smollm2:
        import offline

        windows = offline.token_windows(tok, offline.kjv_verses()[:4000], args.seq_len, max_windows=n)
    else:
        # arithmetic sequences modulo the vocabulary: a pattern a tiny model learns within a few steps
        g = torch.Generator().manual_seed(1234)
        start = torch.randint(0, 128, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        windows = (start + stride * torch.arange(args.seq_len)) % 128
    return windows[rank::world]


def wrap(model, strategy: str, device: torch.device, distributed: bool):
    """Wrap the (already frozen) model for data-parallel training."""
    if not distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    layer_cls = type(model.model.layers[0])
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # use_orig_params=True keeps one parameter per weight (and allows frozen and trained
        # weights in one shard); device_id is required on CPU, where FSDP1 finds no accelerator.
        return FSDP(model, use_orig_params=True, device_id=device, auto_wrap_policy=ModuleWrapPolicy({layer_cls}))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model, strategy: str):
    """name → whole tensor on CPU (gathers FSDP shards; a collective under FSDP)."""
    from kappatune.optimizer import unwrap_model
    from kappatune.refs import clean_name

    def collect():
        out = {}
        for n, p in unwrap_model(model).named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[clean_name(n)] = t.detach().cpu().clone()
        return out

    if strategy == "fsdp1" and dist.is_initialized():
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            return collect()
    return collect()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup()
    distributed = world > 1
    say = print if rank == 0 else (lambda *a, **k: None)
    lr = args.lr if args.lr is not None else (5e-5 if args.smollm2 else 1e-2)
    top_fraction = args.top_fraction if args.top_fraction is not None else (0.1 if args.smollm2 else 0.25)
    t0 = time.perf_counter()

    model, tok = build_model(args)
    model.to(device)
    before = {n: kappatune.cache.tensor_digest(p.detach()) for n, p in model.named_parameters()}

    # 1-2. κ of the bare model, sharded over the ranks; the same table and selection everywhere.
    t_scan = time.perf_counter()
    table = kappatune.scan(model, max_dim=16384, cache=args.cache, progress=False)
    names = table.select(top_fraction=top_fraction)
    say(f"[{world} rank(s), {dist.get_backend() if distributed else 'no process group'}, {args.strategy}] "
        f"κ scan of {len(table)} tensors in {time.perf_counter() - t_scan:.2f}s; training {len(names)}")

    # 3-4. freeze, wrap, optimizer over the selection (KappaTuneOptimizer checks all ranks agree).
    kappatune.freeze_all_but(model, names)
    model = wrap(model, args.strategy, device, distributed)
    opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, names=names, table=table, lr=lr,
                                       weight_decay=0.01, progress=False)
    say(opt.summary())

    data = make_data(args, tok, rank, world).to(device)
    model.train()
    for step in range(args.steps):
        i = (step * args.batch) % max(1, len(data) - args.batch + 1)
        batch = data[i:i + args.batch]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
            mean /= world
        if step == 0 or (step + 1) % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            say(f"step {step + 1:3d}/{args.steps}  loss (mean over ranks) {mean.item():.4f}")

    # Verification: frozen tensors bit-for-bit unchanged on this rank, trained ones equal on all ranks.
    after = full_weights(model, args.strategy)
    frozen_ok = all(kappatune.cache.tensor_digest(after[n]) == d for n, d in before.items() if n not in names)
    changed = sum(kappatune.cache.tensor_digest(after[n]) != before[n] for n in names)
    trained = [kappatune.cache.tensor_digest(after[n]) for n in names]
    frozen_all = [frozen_ok]
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, trained)
        same = all(g == gathered[0] for g in gathered)
        frozen_all = [None] * world
        dist.all_gather_object(frozen_all, frozen_ok)
    else:
        same = True
    say(f"frozen tensors unchanged on every rank: {all(frozen_all)}; trained tensors changed: {changed}/{len(names)}; "
        f"trained tensors identical on all ranks: {same}; {time.perf_counter() - t0:.1f}s")
    if distributed:
        dist.destroy_process_group()
    if not (all(frozen_all) and same and changed == len(names)):
        sys.exit(1)


if __name__ == "__main__":
    main()
