"""Training with a κ selection under torch.distributed: DDP, FSDP1, FSDP2 (gloo, 2 CPU processes).

One spawn of 2 processes runs every DDP case and then every FSDP case (a file:// rendezvous in a tmp
folder; each spawned process costs seconds of imports, so there is only one). The workers train a
few AdamW steps (weight decay on) with different data per rank and save, per rank, the selection
and the full weights; the tests compare the ranks with each other and with the initial weights
(rebuilt here from the same seed):

* frozen tensors bit-for-bit equal to the initial weights on every rank;
* selected tensors changed, and bit-for-bit identical across ranks (the ranks saw different data, so
  this holds only if the gradients were really reduced across ranks).

Errors are recorded by the workers (never left to hang: the process group has a short timeout and
every collective check raises on all ranks) and asserted here.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
import torch.nn.functional as F
from torch import nn

import kappatune
from kappatune.distributed import check_ddp_selection, check_same_selection, check_wrapped_model

WORLD = 2
STEPS = 3
VOCAB = 64
N_SEL = 3
SEED = 0
OPT_KW = dict(lr=1e-2, weight_decay=0.1)
DECAY = 20.0  # decay_to_init: lr · λ = 0.2 per step


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        causal_mean = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        h = h + self.mix(causal_mean)
        return x + self.down(F.gelu(self.up(h)))


class TinyLM(nn.Module):
    """A small decoder-style language model in plain torch (the spawned workers then need no
    transformers import, which costs seconds per process): embedding, residual blocks with causal
    token mixing, final norm, untied head. 8 weight matrices, 2 of them per block."""

    def __init__(self, seed: int = SEED, vocab: int = VOCAB, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_Block(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------- worker side (spawned processes)
def _train(model, opt, rank, steps=STEPS):
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * rank + step)       # every rank sees other data
        model(torch.randint(0, VOCAB, (4, 16), generator=g)).backward()
        opt.step()
        opt.zero_grad()


def _snapshot(module):
    from kappatune.refs import clean_name

    out = {}
    for n, p in module.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p      # FSDP2: DTensor -> whole tensor
        out[clean_name(n)] = t.detach().clone()
    return out


def _attempt(fn):
    """Run ``fn``; return (value, None) or (None, 'ExcType: message')."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - recorded and asserted by the test
        return None, f"{type(e).__name__}: {e}"


def _ddp_part(rank, cache_dir, res):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # A: the optimizer is built on the bare model (it scans, sharded over the ranks), then DDP wraps it.
    model = TinyLM()
    opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, num_tensors=N_SEL, cache=cache_dir,
                                       progress=False, **OPT_KW)
    _train(DDP(model), opt, rank)
    res["opt_then_wrap"] = {"selected": opt.selected, "weights": _snapshot(model)}

    # B: scan, select and freeze the bare model; wrap; the optimizer gets the same selection.
    model = TinyLM()
    table = kappatune.scan(model, cache=cache_dir, progress=False)
    names = table.select(num_tensors=N_SEL)
    kappatune.freeze_all_but(model, names)
    ddp = DDP(model)
    opt = kappatune.KappaTuneOptimizer(ddp, torch.optim.AdamW, names=names, table=table, cache=None,
                                       progress=False, **OPT_KW)
    _train(ddp, opt, rank)
    res["freeze_wrap_names"] = {"names": names, "selected": opt.selected, "weights": _snapshot(model)}

    # B': B with the pull toward the pretrained weights (decay_to_init): the same on every rank.
    model = TinyLM()
    kappatune.freeze_all_but(model, names)
    ddp = DDP(model)
    opt = kappatune.KappaTuneOptimizer(ddp, torch.optim.AdamW, names=names, table=table, cache=None,
                                       progress=False, decay_to_init=DECAY, **OPT_KW)
    _train(ddp, opt, rank)
    res["ddp_decay"] = {"names": names, "selected": opt.selected, "weights": _snapshot(model)}

    # C: DDP built first on a fully trainable model (default DDP settings): refused before any freeze.
    model = TinyLM()
    ddp = DDP(model)
    by_name = dict(model.named_parameters())
    res["wrap_first_check"] = _attempt(lambda: check_ddp_selection(ddp, [by_name[n] for n in names]))[1]
    _, err = _attempt(lambda: kappatune.KappaTuneOptimizer(ddp, torch.optim.AdamW, names=names, table=table,
                                                           cache=None, progress=False, **OPT_KW))
    res["wrap_first_opt"] = err
    res["wrap_first_still_trainable"] = all(p.requires_grad for p in model.parameters())

    # C': a tensor frozen when DDP was built cannot be trained later (DDP would never average it).
    model = TinyLM()
    kappatune.freeze_all_but(model, names[:1])
    ddp = DDP(model)
    by_name = dict(model.named_parameters())
    res["unregistered_check"] = _attempt(lambda: check_ddp_selection(ddp, [by_name[n] for n in names]))[1]

    # D: DDP(find_unused_parameters=True) copes with freezing after wrapping.
    model = TinyLM()
    ddp = DDP(model, find_unused_parameters=True)
    opt = kappatune.KappaTuneOptimizer(ddp, torch.optim.AdamW, num_tensors=N_SEL, cache=cache_dir,
                                       progress=False, **OPT_KW)
    _train(ddp, opt, rank)
    res["wrap_unused"] = {"selected": opt.selected, "weights": _snapshot(model)}

    # D': so does DDP(static_graph=True) (it learns in the first iteration which tensors get no gradient).
    model = TinyLM()
    ddp = DDP(model, static_graph=True)
    opt = kappatune.KappaTuneOptimizer(ddp, torch.optim.AdamW, names=names, table=table, cache=None,
                                       progress=False, **OPT_KW)
    _train(ddp, opt, rank)
    res["wrap_static"] = {"selected": opt.selected, "weights": _snapshot(model)}

    # E: selection mismatch. Rank 1 gets a table without the lowest-κ tensor (e.g. its own stale cache).
    model = TinyLM()
    mine = table if rank == 0 else table.subset(table.names[1:])
    sel = mine.select(num_tensors=N_SEL)
    res["mismatch_check"] = _attempt(lambda: check_same_selection(sel))[1]
    res["order_check"] = _attempt(lambda: check_same_selection(names if rank == 0 else names[::-1]))[1]
    res["order_free_check"] = _attempt(
        lambda: check_same_selection(names if rank == 0 else names[::-1], ordered=False))[1]
    res["same_check"] = _attempt(lambda: check_same_selection(names))[1]
    _, err = _attempt(lambda: kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, table=mine,
                                                           num_tensors=N_SEL, cache=None, progress=False,
                                                           **OPT_KW))
    res["mismatch_opt"] = err
    res["mismatch_still_trainable"] = all(p.requires_grad for p in model.parameters())
    alive = torch.ones(1)
    dist.all_reduce(alive)                                           # no rank left behind
    res["alive"] = float(alive)


def _fsdp_part(rank, cache_dir, res):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    # FSDP1, use_orig_params=True: scan + select + freeze the bare model, wrap, optimizer from names/table.
    model = TinyLM()
    table = kappatune.scan(model, cache=cache_dir, progress=False)
    names = table.select(num_tensors=N_SEL)
    kappatune.freeze_all_but(model, names)
    fsdp = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    res["fsdp1_shard_shapes"] = {n: tuple(p.shape) for n, p in fsdp.named_parameters()}
    res["fsdp1_scan_check"] = _attempt(lambda: check_wrapped_model(fsdp, scanning=True))[1]
    res["fsdp1_table_check"] = _attempt(lambda: check_wrapped_model(fsdp, scanning=False))[1]
    opt, err = _attempt(lambda: kappatune.KappaTuneOptimizer(fsdp, torch.optim.AdamW, names=names, table=table,
                                                             cache=None, progress=False, **OPT_KW))
    res["fsdp1_opt_error"] = err
    if opt is not None:
        _train(fsdp, opt, rank)
        with FSDP.summon_full_params(fsdp, writeback=False):
            res["fsdp1"] = {"names": names, "selected": opt.selected, "weights": _snapshot(fsdp)}
    res["fsdp1_scan_opt"] = _attempt(lambda: kappatune.KappaTuneOptimizer(
        fsdp, torch.optim.AdamW, num_tensors=N_SEL, cache=None, progress=False, **OPT_KW))[1]

    # FSDP1 with decay_to_init: the pull acts on each rank's local shards.
    model = TinyLM()
    kappatune.freeze_all_but(model, names)
    fsdp = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    opt = kappatune.KappaTuneOptimizer(fsdp, torch.optim.AdamW, names=names, table=table, cache=None,
                                       progress=False, decay_to_init=DECAY, **OPT_KW)
    _train(fsdp, opt, rank)
    with FSDP.summon_full_params(fsdp, writeback=False):
        res["fsdp1_decay"] = {"names": names, "selected": opt.selected, "weights": _snapshot(fsdp)}
    res["fsdp1_base_weights"] = _attempt(lambda: opt.base_weights().__enter__())[1]

    # FSDP1, use_orig_params=False: flat parameters, no per-tensor selection possible.
    flat = FSDP(TinyLM(), use_orig_params=False, device_id=torch.device("cpu"))
    res["flat_check"] = _attempt(lambda: check_wrapped_model(flat, scanning=False))[1]
    res["flat_opt"] = _attempt(lambda: kappatune.KappaTuneOptimizer(
        flat, torch.optim.AdamW, names=names, table=table, cache=None, progress=False, **OPT_KW))[1]

    # FSDP2 (fully_shard on a CPU device mesh): same recommended flow.
    model = TinyLM()
    kappatune.freeze_all_but(model, names)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    res["fsdp2_scan_check"] = _attempt(lambda: check_wrapped_model(model, scanning=True))[1]
    res["fsdp2_table_check"] = _attempt(lambda: check_wrapped_model(model, scanning=False))[1]
    # DTensor parameters keep the whole shape: a table with a selection policy works too (not only names=)
    opt, err = _attempt(lambda: kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, table=table,
                                                             num_tensors=N_SEL, cache=None, progress=False,
                                                             **OPT_KW))
    res["fsdp2_opt_error"] = err
    if opt is not None:
        _train(model, opt, rank)
        res["fsdp2"] = {"names": names, "selected": opt.selected, "weights": _snapshot(model)}
    # FSDP2 with decay_to_init: on the DTensor shards.
    model = TinyLM()
    kappatune.freeze_all_but(model, names)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, names=names, table=table, cache=None,
                                       progress=False, decay_to_init=DECAY, **OPT_KW)
    _train(model, opt, rank)
    res["fsdp2_decay"] = {"names": names, "selected": opt.selected, "weights": _snapshot(model)}
    # Without the check in the optimizer, scanning DTensor shards blocks in a collective until the
    # group's timeout; do not wait for that when the optimizer does not call the check at all.
    import inspect

    import kappatune.optimizer as optimizer_module

    if "check_wrapped_model" in inspect.getsource(optimizer_module):
        res["fsdp2_scan_opt"] = _attempt(lambda: kappatune.KappaTuneOptimizer(
            model, torch.optim.AdamW, num_tensors=N_SEL, cache=None, progress=False, **OPT_KW))[1]
    else:
        res["fsdp2_scan_opt"] = "not attempted: kappatune/optimizer.py does not call check_wrapped_model"


def _worker(rank, init_file, out_dir, cache_dir):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=45))
    res = {}
    try:
        for part in (_ddp_part, _fsdp_part):
            try:
                part(rank, cache_dir, res)
            except Exception:  # noqa: BLE001 - reported by the tests
                res[f"crash{part.__name__}"] = traceback.format_exc()
                dist.barrier()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ---------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of 2 gloo processes running every DDP and FSDP case; per-rank results."""
    base = tmp_path_factory.mktemp("dist")
    tmp_mp.spawn(_worker, args=(str(base / "init"), str(base), str(base / "cache")), nprocs=WORLD, join=True)
    return [torch.load(base / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _part(runs, name):
    for r, res in enumerate(runs):
        crash = res.get(f"crash_{name}_part")
        assert crash is None, f"rank {r} crashed in the {name} part:\n{crash}"
    return runs


@pytest.fixture(scope="module")
def ddp_runs(runs):
    return _part(runs, "ddp")


@pytest.fixture(scope="module")
def fsdp_runs(runs):
    return _part(runs, "fsdp")


@pytest.fixture(scope="module")
def initial():
    return {n: p.detach().clone() for n, p in TinyLM().named_parameters()}


def _assert_trained_only_selection(runs, key, initial):
    r0, r1 = runs[0][key], runs[1][key]
    selected = r0["selected"]
    assert len(selected) == N_SEL and r1["selected"] == selected          # same tensors, same order
    assert set(r0["weights"]) == set(initial)
    for name, w0 in initial.items():
        a, b = r0["weights"][name], r1["weights"][name]
        if name in selected:
            assert torch.equal(a, b), f"{name}: trained tensor differs between ranks"
            assert not torch.equal(a, w0), f"{name}: selected but unchanged"
        else:
            assert torch.equal(a, w0) and torch.equal(b, w0), f"{name}: frozen tensor changed"


def test_ddp_optimizer_built_before_wrapping(ddp_runs, initial):
    _assert_trained_only_selection(ddp_runs, "opt_then_wrap", initial)


def test_ddp_freeze_then_wrap_then_optimizer_with_names(ddp_runs, initial):
    _assert_trained_only_selection(ddp_runs, "freeze_wrap_names", initial)
    run = ddp_runs[0]["freeze_wrap_names"]
    assert sorted(run["selected"]) == sorted(run["names"])


def test_ddp_find_unused_parameters_or_static_graph_cope_with_freezing_after_wrapping(ddp_runs, initial):
    _assert_trained_only_selection(ddp_runs, "wrap_unused", initial)
    _assert_trained_only_selection(ddp_runs, "wrap_static", initial)


def test_ddp_wrapped_before_freezing_is_detected(ddp_runs):
    for res in ddp_runs:
        err = res["wrap_first_check"]
        assert err and err.startswith("ValueError") and "Expected to have finished reduction" in err
        assert "find_unused_parameters=True" in err and "freeze_all_but" in err
        err = res["unregistered_check"]
        assert err and err.startswith("ValueError") and "frozen when DistributedDataParallel was built" in err


def test_optimizer_refuses_a_ddp_model_wrapped_before_freezing(ddp_runs):
    """Needs optimizer.py to call kappatune.distributed.check_ddp_selection before freezing."""
    for res in ddp_runs:
        assert res["wrap_first_opt"] and "Expected to have finished reduction" in res["wrap_first_opt"]
        assert res["wrap_first_still_trainable"]                           # refused before any freeze


def _distance(weights, initial, names):
    return sum(float((weights[n] - initial[n]).norm() ** 2) for n in names) ** 0.5


@pytest.mark.parametrize("key, plain", [("ddp_decay", "freeze_wrap_names"), ("fsdp1_decay", "fsdp1"),
                                        ("fsdp2_decay", "fsdp2")])
def test_decay_to_init_keeps_ranks_identical_and_pulls_toward_the_base(runs, initial, key, plain):
    for r, res in enumerate(runs):
        assert res.get(f"crash_{'ddp' if key.startswith('ddp') else 'fsdp'}_part") is None, res
    _assert_trained_only_selection(runs, key, initial)                # ranks bit-identical, frozen untouched
    names = runs[0][key]["selected"]
    assert _distance(runs[0][key]["weights"], initial, names) < _distance(runs[0][plain]["weights"], initial, names)


def test_base_weights_is_refused_on_a_sharded_model(fsdp_runs):
    for res in fsdp_runs:
        assert res["fsdp1_base_weights"] and "FSDP-sharded" in res["fsdp1_base_weights"]


def test_selection_mismatch_raises_on_every_rank(ddp_runs):
    for res in ddp_runs:
        err = res["mismatch_check"]
        assert err and err.startswith("ValueError")
        assert "ranks [1] differ from rank 0" in err and "first difference at position 0" in err
        assert "another order" in res["order_check"]
        assert res["order_free_check"] is None and res["same_check"] is None
        assert res["alive"] == WORLD                                       # both ranks went on, no hang
    assert ddp_runs[0]["mismatch_check"] == ddp_runs[1]["mismatch_check"]  # the same message everywhere


def test_optimizer_refuses_mismatched_selections(ddp_runs):
    """Needs optimizer.py to call kappatune.distributed.check_same_selection after selecting."""
    for res in ddp_runs:
        assert res["mismatch_opt"] and "differ between ranks" in res["mismatch_opt"]
        assert res["mismatch_still_trainable"]


def test_fsdp1_use_orig_params_trains_only_the_selection(fsdp_runs, initial):
    for res in fsdp_runs:
        assert res["fsdp1_opt_error"] is None, res["fsdp1_opt_error"]
        # the parameters seen after wrapping are flat 1-D shards: why the scan must come first
        assert all(len(s) == 1 for s in res["fsdp1_shard_shapes"].values())
    assert fsdp_runs[0]["fsdp1_shard_shapes"] != fsdp_runs[1]["fsdp1_shard_shapes"]
    _assert_trained_only_selection(fsdp_runs, "fsdp1", initial)


def test_fsdp2_fully_shard_trains_only_the_selection(fsdp_runs, initial):
    for res in fsdp_runs:
        assert res["fsdp2_opt_error"] is None, res["fsdp2_opt_error"]
        assert res["fsdp2"]["selected"] == res["fsdp2"]["names"]          # policy on the table = the names
    _assert_trained_only_selection(fsdp_runs, "fsdp2", initial)


def test_scanning_a_sharded_model_or_flat_params_is_refused(fsdp_runs):
    for res in fsdp_runs:
        for key in ("fsdp1_scan_check", "fsdp2_scan_check"):
            assert res[key] and res[key].startswith("ValueError") and "before wrapping" in res[key], res[key]
        assert "FSDP1" in res["fsdp1_scan_check"] and "FSDP2" in res["fsdp2_scan_check"]
        assert res["fsdp1_table_check"] is None and res["fsdp2_table_check"] is None
        assert res["flat_check"] and "use_orig_params=True" in res["flat_check"]


def test_optimizer_refuses_sharded_scans_and_flat_params(fsdp_runs):
    """Needs optimizer.py to call kappatune.distributed.check_wrapped_model before scanning."""
    for res in fsdp_runs:
        for key in ("fsdp1_scan_opt", "fsdp2_scan_opt"):
            assert res[key] and "before wrapping" in res[key], res[key]
        assert res["flat_opt"] and "use_orig_params=True" in res["flat_opt"], res["flat_opt"]


def test_checks_are_no_ops_without_a_process_group():
    model = TinyLM()
    assert not dist.is_initialized()
    check_same_selection(["anything"])                     # nothing to compare with
    check_wrapped_model(model, scanning=True)              # a bare model is fine
    check_ddp_selection(model, [])                         # not DDP: nothing to check
    with pytest.raises(TypeError, match="single string"):
        check_same_selection("layers.0.up.weight")
    assert kappatune.distributed.sharding_kind(model) is None
