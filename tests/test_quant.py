"""κ of bitsandbytes 4-bit / 8-bit weights: real quantized models loaded through transformers."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

import kappatune
from kappatune import quant
from kappatune.cache import KappaCache

from .conftest import make_tiny_llama

# A missing optional dependency skips this file; one that is installed but fails to import fails it
# (pytest.importorskip would skip a broken install as if it were absent).
_MISSING = [m for m in ("transformers", "bitsandbytes") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"needs {' and '.join(_MISSING)}: pip install -e \".[hf,quant]\"", allow_module_level=True)

import bitsandbytes as bnb  # noqa: E402
import transformers  # noqa: E402

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved to disk (float32), to be loaded quantized."""
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(seed=3).save_pretrained(d)
    return d


def load_quantized(path, kind, dtype=torch.float32):
    cfg = dict(CONFIGS[kind])
    if cfg.get("load_in_4bit"):
        cfg["bnb_4bit_compute_dtype"] = dtype
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.BitsAndBytesConfig(**cfg), dtype=dtype)


def reference_dequant(p):
    """Dequantize with bitsandbytes directly (independent of kappatune.quant)."""
    if isinstance(p, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(p.data, p.quant_state)
    return p.data.double() * p.SCB.double().view(-1, 1) / 127.0


def numpy_kappa(w):
    s = np.linalg.svd(w.detach().double().numpy(), compute_uv=False)
    return s[0] / s[-1]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_quantized_model_scans_to_kappa_of_dequantized_weights(checkpoint, kind):
    model = load_quantized(checkpoint, kind)
    qnames = [n for n, p in model.named_parameters() if quant.is_quantized_param(p)]
    assert len(qnames) == 2 * len(LINEARS)  # every linear layer of both blocks is quantized
    table = kappatune.scan(model, cache=False, progress=False)
    params = dict(model.named_parameters())
    for name in qnames:
        e = table[name]
        assert e.dtype == ("int8" if kind == "int8" else kind.split("-")[0])
        assert e.layout == "matrix"
        ref = reference_dequant(params[name])
        assert e.shape == tuple(ref.shape) and len(e.shape) == 2  # the logical shape, not the packed one
        assert abs(e.kappa - numpy_kappa(ref)) <= 1e-6 * numpy_kappa(ref), name
    # the float tensors of the same model are scanned as usual
    assert table["lm_head.weight"].dtype == "float32"
    assert "model.norm.weight" in table.skipped


def test_dequantized_kappa_tracks_the_quantized_weight_not_the_original(checkpoint):
    """κ of the 4-bit model is κ of what the layer computes with, close to but not the float κ."""
    model = load_quantized(checkpoint, "nf4")
    orig = make_tiny_llama(seed=3)
    name = "model.layers.0.self_attn.k_proj.weight"  # a well-conditioned 32x64 matrix
    k_q = kappatune.scan(model, cache=False, progress=False)[name].kappa
    k_f = kappatune.condition_number(dict(orig.named_parameters())[name])
    assert k_q != pytest.approx(k_f, rel=1e-6)
    assert k_q == pytest.approx(k_f, rel=0.1)


def test_is_quantized_param(checkpoint):
    model = load_quantized(checkpoint, "nf4")
    assert quant.is_quantized_param(model.model.layers[0].mlp.up_proj.weight)
    assert not quant.is_quantized_param(model.model.norm.weight)
    assert not quant.is_quantized_param(model.lm_head.weight)
    assert quant.quantized_ref("lm_head.weight", model.lm_head.weight, model.lm_head) is None
    m8 = load_quantized(checkpoint, "int8")
    assert quant.is_quantized_param(m8.model.layers[1].self_attn.o_proj.weight)
    # a bitsandbytes parameter that still holds its float weight is not quantized (yet)
    raw = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    assert not quant.is_quantized_param(raw)
    assert quant.quantized_ref("w", raw, None) is None
    fp16 = bnb.nn.Int8Params(torch.randn(8, 8), requires_grad=False, has_fp16_weights=True)
    assert not quant.is_quantized_param(fp16)
    assert not quant.is_quantized_param(torch.zeros(3, dtype=torch.int8))


def test_cache_digest_covers_quantized_bytes_and_state(checkpoint):
    model = load_quantized(checkpoint, "nf4")
    lin = model.model.layers[0].mlp.down_proj
    p = lin.weight
    ref = quant.quantized_ref("down", p, lin)
    d0 = ref.digest()
    assert d0 == quant.quantized_ref("down", p, lin).digest()
    qs = p.quant_state

    def changed(mutate, undo):
        mutate()
        try:
            return ref.digest()
        finally:
            undo()

    def swap(attr, value):
        old = getattr(qs, attr)
        return (lambda: setattr(qs, attr, value)), (lambda: setattr(qs, attr, old))

    with torch.no_grad():
        b = int(p.data.view(-1)[5])
        c3 = float(qs.code[3])
        seen = {d0}
        for new in (
            changed(lambda: p.data.view(-1).__setitem__(5, b ^ 0x01), lambda: p.data.view(-1).__setitem__(5, b)),
            changed(lambda: qs.absmax.mul_(2), lambda: qs.absmax.div_(2)),
            changed(lambda: qs.code.__setitem__(3, c3 + 1e-3), lambda: qs.code.__setitem__(3, c3)),
            changed(*swap("blocksize", 128)),
            changed(*swap("quant_type", "fp4")),
            changed(*swap("dtype", torch.bfloat16)),
            changed(*swap("shape", torch.Size([qs.shape[1], qs.shape[0]]))),
        ):
            assert new not in seen
            seen.add(new)
    assert ref.digest() == d0  # every change undone

    m8 = load_quantized(checkpoint, "int8")
    lin8 = m8.model.layers[0].mlp.down_proj
    r8 = quant.quantized_ref("down", lin8.weight, lin8)
    e0 = r8.digest()
    with torch.no_grad():
        lin8.weight.SCB[0] *= 1.5
        e1 = r8.digest()
        lin8.weight.SCB[0] /= 1.5
        lin8.weight.data[0, 0] += 1
        e2 = r8.digest()
        lin8.weight.data[0, 0] -= 1
    assert len({e0, e1, e2}) == 3 and r8.digest() == e0


def test_cache_reuse_and_requantization(checkpoint, tmp_path):
    cache_dir = tmp_path / "c"
    nf4 = load_quantized(checkpoint, "nf4")
    t_nf4 = kappatune.scan(nf4, cache=cache_dir, progress=False)

    again = KappaCache(cache_dir)
    t_again = kappatune.scan(load_quantized(checkpoint, "nf4"), cache=again, progress=False)
    assert again.misses == 0 and again.hits == len(t_nf4)  # a re-load of the same quantization: all cached
    assert t_again.kappas == t_nf4.kappas

    fp4 = load_quantized(checkpoint, "fp4")
    c = KappaCache(cache_dir)
    t_fp4 = kappatune.scan(fp4, cache=c, progress=False)
    q = [n for n, p in fp4.named_parameters() if quant.is_quantized_param(p)]
    assert c.misses == len(q)  # every quantized weight recomputed, the float ones reused
    fp4_params = dict(fp4.named_parameters())
    for n in q:
        assert t_fp4[n].digest != t_nf4[n].digest
        assert t_fp4[n].kappa == pytest.approx(numpy_kappa(reference_dequant(fp4_params[n])), rel=1e-6)

    # change the stored bytes of one weight in place: its κ is recomputed, not taken from the cache
    name = "model.layers.1.self_attn.v_proj.weight"
    p = dict(nf4.named_parameters())[name]
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        p.data.view(-1)[:64] = torch.randint(0, 256, (64,), dtype=torch.uint8, generator=g)
    c2 = KappaCache(cache_dir)
    t2 = kappatune.scan(nf4, cache=c2, progress=False)
    assert c2.misses == 1
    assert t2[name].kappa == pytest.approx(numpy_kappa(reference_dequant(p)), rel=1e-6)
    assert t2[name].kappa != pytest.approx(t_nf4[name].kappa, rel=1e-9)


@pytest.mark.parametrize("kind", ["fp4", "nf4-dq"])
def test_cpu_packed_4bit_layout(checkpoint, kind):
    """bitsandbytes rewrites 4-bit weights in place for its AVX512-BF16 CPU kernel (at the first
    eval-mode forward on such CPUs); the scan must still see the weight the layer computes with."""
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU-packed 4-bit layout")
    model = load_quantized(checkpoint, kind, dtype=torch.bfloat16)
    name = "model.layers.1.mlp.gate_proj.weight"
    lin = model.model.layers[1].mlp.gate_proj
    p, qs = lin.weight, lin.weight.quant_state
    before = kappatune.scan(model, cache=False, progress=False)[name]
    # what the packed layer computes with: the same codes, absmax rounded to bfloat16
    absmax = (bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if qs.nested else qs.absmax
    expected = bnb.functional.dequantize_4bit(p.data.clone(), bnb.functional.QuantState(
        absmax=absmax.float().to(torch.bfloat16).float(), shape=qs.shape, code=qs.code.clone(),
        blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=torch.float32))
    d_before = quant.quantized_ref(name, p, lin).digest()
    with torch.no_grad():
        if bnb.functional.has_avx512bf16() and lin.support_avx512bf16_for_cpu:
            model.eval()
            model(input_ids=torch.arange(8).view(1, 8))  # bitsandbytes repacks here
        else:
            p.data, p.quant_state = convert(p.data, qs)
    assert getattr(p.quant_state, "packing_format_for_cpu", False)
    assert tuple(p.data.shape) == (expected.shape[0], expected.shape[1] // 2)
    deq = quant.dequantize(p, name, lin)
    assert torch.equal(deq, expected)
    after = kappatune.scan(model, cache=False, progress=False)[name]
    assert after.kappa == pytest.approx(numpy_kappa(expected), rel=1e-6)
    assert after.kappa == pytest.approx(before.kappa, rel=2e-2)  # only absmax rounding differs
    assert quant.quantized_ref(name, p, lin).digest() != d_before


def test_int8_without_scales_is_a_clear_error():
    p = bnb.nn.Int8Params(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False, has_fp16_weights=False)
    ref = quant.quantized_ref("layer.weight", p, None)
    assert ref is not None and ref.dtype == "int8"
    with pytest.raises(ValueError, match=r"layer\.weight: int8 weight without its SCB"):
        ref.load()
    with pytest.raises(ValueError, match="exclude"):
        ref.digest()


def test_bitsandbytes_and_peft_are_not_imported_for_ordinary_models():
    code = (
        "import sys, torch, kappatune, kappatune.integrations.peft\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))\n"
        "t = kappatune.scan(m, cache=False, progress=False)\n"
        "assert len(t) == 2\n"
        "bad = [k for k in ('bitsandbytes', 'peft', 'transformers') if k in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -- the optimizer refuses to train a quantized tensor in full ----------------------------------
def _optimizer_cls():
    # part of the package, not an optional dependency: a broken optimizer module fails these tests
    from kappatune.optimizer import KappaTuneOptimizer

    return KappaTuneOptimizer


def test_a_broken_optimizer_module_fails_the_tests_instead_of_skipping_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "kappatune.optimizer", None)  # an import of it now raises ImportError
    try:
        _optimizer_cls()
    except ImportError:
        pass
    except pytest.skip.Exception:
        pytest.fail("a kappatune.optimizer that cannot be imported is skipped instead of reported")
    else:
        pytest.fail("the import of a broken kappatune.optimizer did not fail")


def test_optimizer_refuses_quantized_tensor(checkpoint):
    Opt = _optimizer_cls()
    model = load_quantized(checkpoint, "nf4", dtype=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        Opt(model, torch.optim.AdamW, names=[name], lr=1e-3)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and re_search(r"quantiz", msg)
    table = kappatune.scan(model, progress=False)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=r"(?i)quantiz"):
        Opt(model, torch.optim.AdamW, num_tensors=len(table), lr=1e-3)  # every tensor: quantized ones too


def test_optimizer_trains_float_tensors_of_a_quantized_model(checkpoint):
    Opt = _optimizer_cls()
    model = load_quantized(checkpoint, "nf4", dtype=torch.bfloat16)
    names = ["model.norm.weight", "lm_head.weight"]
    assert model.lm_head.weight.dtype == torch.bfloat16
    opt = Opt(model, torch.optim.AdamW, names=names, lr=1e-2)
    packed = {n: p.data.clone() for n, p in model.named_parameters() if quant.is_quantized_param(p)}
    before = {n: dict(model.named_parameters())[n].detach().clone() for n in names}
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()  # (in eval mode bitsandbytes may repack 4-bit weights for its CPU kernel)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    for n in names:
        assert not torch.equal(params[n].detach(), before[n]), n
    for n, data in packed.items():
        assert torch.equal(params[n].data, data), n


def re_search(pattern, text):
    import re

    return re.search(pattern, text, re.IGNORECASE) is not None
