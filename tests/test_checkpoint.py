"""kappatune.checkpoint: κ of safetensors checkpoints read from disk, one tensor at a time."""

import json
import os
import sys

import pytest
import torch
from torch import nn

import kappatune
from kappatune.cache import KappaCache
from kappatune.checkpoint import (CheckpointError, checkpoint_files, checkpoint_layout, checkpoint_refs,
                                  scan_checkpoint)
from kappatune.pipeline import scan_refs

safetensors_torch = pytest.importorskip("safetensors.torch")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.up_proj = nn.Linear(16, 24, bias=True)
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    """Names like a transformer, plus a 3-D convolution kernel and a 3-D expert stack."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(40, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv1 = nn.Conv1d(4, 8, 3)
        self.experts = nn.Parameter(torch.randn(3, 8, 6))
        self.lm_head = nn.Linear(16, 40, bias=False)


def _save_sharded(model, folder, dtype=torch.float32):
    """Two shards and an index, as save_pretrained writes them."""
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        safetensors_torch.save_file({k: sd[k] for k in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def test_sharded_checkpoint_equals_model_scan_and_fills_its_cache(tmp_path):
    model = Net()
    ckpt = _save_sharded(model, tmp_path / "ckpt")
    cache_dir = tmp_path / "cache"
    table = scan_checkpoint(ckpt, cache=cache_dir, progress=False)
    ref = kappatune.scan(model, cache=False, progress=False)
    # same tensors, same names as named_parameters(), same κ and layouts
    assert table.names == ref.names
    assert {n for n, p in model.named_parameters() if p.ndim >= 2} == set(table.names)
    for e in table:
        r = ref[e.name]
        assert e.kappa == pytest.approx(r.kappa, rel=1e-12)
        assert (e.layout, e.shape, e.dtype) == (r.layout, r.shape, r.dtype)
    assert table["conv1.weight"].layout == "flatten"
    assert table["experts"].layout == "stack" and len(table["experts"].per_matrix) == 3
    assert table.skipped == ref.skipped  # biases and norms: ndim<2
    # the model finds every value in the cache the checkpoint scan wrote: nothing recomputed
    cache = KappaCache(cache_dir)
    again = kappatune.scan(model, cache=cache, progress=False)
    assert (cache.hits, cache.misses) == (len(table), 0)
    assert again.kappas == table.kappas


def test_bf16_file_digest_matches_the_bf16_model(tmp_path):
    model = Net().to(torch.bfloat16)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    table = scan_checkpoint(path, cache=tmp_path / "c", progress=False)
    assert {e.dtype for e in table} == {"bfloat16"}
    cache = KappaCache(tmp_path / "c")
    same = kappatune.scan(model, cache=cache, progress=False)
    assert (cache.hits, cache.misses) == (len(table), 0)
    assert same.kappas == table.kappas
    # the float32 model has other bytes: it must not be served the bf16 entries
    cache32 = KappaCache(tmp_path / "c")
    kappatune.scan(model.float(), cache=cache32, progress=False)
    assert cache32.hits == 0 and cache32.misses == len(table)


def test_filters_and_non_float_tensors(tmp_path):
    sd = {k: v.contiguous() for k, v in Net().state_dict().items()}
    sd["position_ids"] = torch.arange(12).reshape(3, 4)  # an integer tensor
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(sd, str(path))
    table = scan_checkpoint(path, cache=False, progress=False, max_dim=30, exclude=["conv"], include=[r"\.", "experts", "position"])
    assert table.skipped["position_ids"] == "not floating point"
    assert table.skipped["embed_tokens.weight"] == table.skipped["lm_head.weight"] == "max_dim"  # 40 rows
    assert table.skipped["conv1.weight"] == "excluded"
    assert table.skipped["layers.0.norm.weight"] == "ndim<2"
    assert set(table.names) == {"layers.0.q_proj.weight", "layers.1.q_proj.weight", "layers.0.up_proj.weight",
                                "layers.1.up_proj.weight", "experts"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and /proc/self/fd")
def test_file_opened_once_and_never_mapped(tmp_path, monkeypatch):
    """Each file is opened once for all its tensors (not once per tensor), and no page of it is mapped
    into the process, before, during or after a tensor is read: memory does not grow with the checkpoint."""
    import safetensors

    path = tmp_path / "model.safetensors"
    sd = {k: v.contiguous() for k, v in Net().state_dict().items()}
    sd.update({f"extra.{i}.weight": torch.randn(4, 3) for i in range(40)})
    safetensors_torch.save_file(sd, str(path))

    def mapped():
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if line.rstrip().endswith(str(path)))

    def fds():
        d = "/proc/self/fd"
        return sum(1 for fd in os.listdir(d) if os.path.realpath(os.path.join(d, fd)) == str(path.resolve()))

    opens = []
    real_safe_open, real_os_open = safetensors.safe_open, os.open
    monkeypatch.setattr(safetensors, "safe_open", lambda p, *a, **kw: (opens.append(p), real_safe_open(p, *a, **kw))[1])
    monkeypatch.setattr(os, "open", lambda p, *a, **kw: (opens.append(os.fspath(p)) if os.fspath(p) == str(path)
                                                          else None, real_os_open(p, *a, **kw))[1])
    seen = []
    refs = checkpoint_refs(path)
    for r in refs:
        def load(orig=r.load):
            before = mapped()
            t = orig()
            seen.append((before, mapped(), fds()))
            return t
        r.load = load
    table = scan_refs(refs, cache=tmp_path / "c", progress=False)
    monkeypatch.undo()
    assert len(seen) == len(table) > 40
    assert all(before == 0 and during == 0 and n_fd == 1 for before, during, n_fd in seen), seen
    assert mapped() == 0
    assert len([p for p in opens if os.fspath(p) == str(path)]) <= 2  # the header once, the data once
    assert table.kappas == scan_checkpoint(path, cache=False, progress=False).kappas
    ref = kappatune.scan({k: v for k, v in sd.items()}, cache=False, progress=False)
    assert all(table[e.name].kappa == e.kappa for e in ref)  # bit for bit the tensors of the file


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_or_device_is_refused_not_waited_on(tmp_path):
    import signal

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("blocked on the FIFO")))
    signal.alarm(5)
    try:
        with pytest.raises(CheckpointError, match="is a FIFO"):
            checkpoint_refs(fifo)
        with pytest.raises(CheckpointError, match="is a FIFO"):
            checkpoint_refs(tmp_path)  # the folder's model.safetensors
        with pytest.raises(CheckpointError, match="is a device"):
            checkpoint_refs("/dev/zero")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_index_shards_outside_the_folder_and_empty_indexes_are_refused(tmp_path):
    ckpt = _save_sharded(Net(), tmp_path / "ckpt")
    elsewhere = _save_sharded(Net(), tmp_path / "elsewhere")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in ["../elsewhere/model-00001-of-00002.safetensors", str(elsewhere / "model-00001-of-00002.safetensors"),
                  "sub/../../elsewhere/model-00001-of-00002.safetensors"]:
        bad = {**index, "weight_map": {k: shard for k in index["weight_map"]}}
        index_path.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            checkpoint_refs(ckpt)
    index_path.write_text(json.dumps({**index, "weight_map": {}}))
    with pytest.raises(CheckpointError, match="weight_map is empty"):
        checkpoint_refs(ckpt)


def test_layout_rule():
    assert checkpoint_layout("encoder.conv1.weight", (8, 4, 3)) == "flatten"
    assert checkpoint_layout("model.layers.0.mixer.Conv1d.weight", (8, 1, 4)) == "flatten"
    assert checkpoint_layout("model.layers.0.mlp.experts.gate_up_proj", (4, 8, 6)) == "auto"  # a stack
    assert checkpoint_layout("model.layers.0.conv.weight", (8, 4, 3, 3)) == "auto"  # 4-D: flattened anyway
    assert checkpoint_layout("conv.weight", (8, 4)) == "auto"


def test_folder_resolution(tmp_path):
    model = Net()
    sharded = _save_sharded(model, tmp_path / "sharded")
    files = checkpoint_files(sharded)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # the index file itself, and the shards given one by one (and one twice), give the same tensors
    by_index = {r.name for r in checkpoint_refs(sharded / "model.safetensors.index.json")}
    by_files = {r.name for r in checkpoint_refs([*files, files[0].resolve()])}
    assert by_index == by_files == set(model.state_dict())


def test_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        checkpoint_refs(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights .*pytorch_model\.bin.*save_pretrained"):
        checkpoint_refs(empty)
    good = tmp_path / "good.safetensors"
    safetensors_torch.save_file({"a.weight": torch.randn(4, 4)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a valid safetensors file"):
        checkpoint_refs(bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not tensors\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a valid safetensors file.*is it a \.safetensors"):
        checkpoint_refs(text)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="'a.weight' is in both"):
        checkpoint_refs([good, copy])
    ckpt = _save_sharded(Net(), tmp_path / "broken")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight.*does not hold it"):
        checkpoint_refs(ckpt)
    os.remove(ckpt / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: \['model-00002-of-00002.safetensors'\]"):
        checkpoint_refs(ckpt)
    other = tmp_path / "config.json"
    other.write_text('{"hidden_size": 4}')
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        checkpoint_refs(other)
    with pytest.raises(CheckpointError, match="no checkpoint path"):
        checkpoint_refs([])


def _raw_safetensors(path, code, shape=(4, 4), nbytes=64):
    """A safetensors file written by hand, with any dtype code in its header."""
    import struct

    header = json.dumps({"w.weight": {"dtype": code, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))


@pytest.mark.parametrize("code", ["XYZ", "DTYPE"])
def test_an_unknown_dtype_code_is_a_checkpoint_error(tmp_path, capsys, code):
    """The header is parsed once by kappatune; a dtype code it does not know goes to safetensors to
    judge, and a file it refuses is a one-line CheckpointError (the CLI: exit 2), not a TypeError."""
    from kappatune.cli import main

    path = tmp_path / "odd.safetensors"
    _raw_safetensors(path, code)
    with pytest.raises(CheckpointError, match="odd.safetensors"):
        checkpoint_refs(path)
    assert main(["scan", str(path), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kappatune: error: ") and "odd.safetensors" in err and err.count("\n") == 1


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_refused_at_the_header(tmp_path):
    path = tmp_path / "short.safetensors"
    _raw_safetensors(path, "F32", shape=(4, 4), nbytes=60)
    with pytest.raises(CheckpointError, match="60 bytes, not shape"):
        checkpoint_refs(path)
