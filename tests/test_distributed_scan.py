"""Sharded κ scan under torch.distributed (gloo, 2 CPU processes)."""

import importlib
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

import kappatune

WORLD = 2


def _worker(rank, init_file, cache_dir, out_dir, seed):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.conftest import make_tiny_llama

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        scan_mod = importlib.import_module("kappatune.pipeline")
        store = importlib.import_module("kappatune.cache")._SqliteStore  # the one place entries reach disk

        computed, writes = [], []
        real_kappa_of, real_write = scan_mod.kappa_of, store.put_many

        def counting(tensor, **kw):
            computed.append(kw["name"])
            return real_kappa_of(tensor, **kw)

        def counting_write(self, entries):
            writes.append(len(entries))
            return real_write(self, entries)

        scan_mod.kappa_of = counting
        store.put_many = counting_write
        model = make_tiny_llama(seed=seed, layers=3)
        table = kappatune.scan(model, cache=cache_dir, progress=False)
        first = list(computed)
        computed.clear()
        warm = kappatune.scan(model, cache=cache_dir, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"table": table.to_dict(), "warm": warm.to_dict(), "computed": first,
                       "computed_warm": list(computed), "writes": writes}, f)
    finally:
        dist.destroy_process_group()


def test_sharded_scan_matches_single_process_and_writes_cache_once(tmp_path):
    cache_dir, out_dir = tmp_path / "cache", tmp_path / "out"
    out_dir.mkdir()
    tmp_mp.spawn(_worker, args=(str(tmp_path / "init"), str(cache_dir), str(out_dir), 7), nprocs=WORLD, join=True)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]

    from tests.conftest import make_tiny_llama

    single = kappatune.scan(make_tiny_llama(seed=7, layers=3), cache=None, progress=False)
    n = len(single)
    for r in ranks:
        assert r["table"] == r["warm"] == ranks[0]["table"]          # identical on every rank
        got = kappatune.KappaTable.from_dict(r["table"])
        assert got.names == single.names
        for e in single:
            assert got[e.name].kappa == pytest.approx(e.kappa, rel=1e-12)
        assert r["computed_warm"] == []                               # the cache serves both ranks
    shares = [set(r["computed"]) for r in ranks]
    assert shares[0].isdisjoint(shares[1]) and len(shares[0] | shares[1]) == n
    assert all(0 < len(s) < n for s in shares)                        # each rank did only its share
    assert ranks[0]["writes"] == [n] and ranks[1]["writes"] == []     # rank 0 wrote, once
    assert len(kappatune.KappaCache(cache_dir)) == n
