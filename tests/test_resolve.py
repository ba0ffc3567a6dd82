"""One selection vocabulary: SelectionPolicy, NameFilter, resolve_selection, the layout rule, spellings."""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import kappatune
import kappatune.cache
from kappatune import KappaTuneOptimizer
from kappatune.refs import default_layout, matrix_dims, resolve_layout
from kappatune.resolve import resolve_selection
from kappatune.pipeline import filter_refs, lookup, model_refs
from kappatune.refs import NameFilter
from kappatune.selection import SelectionPolicy
from kappatune.table import KappaEntry, KappaTable

from .conftest import make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table():
    return KappaTable([KappaEntry(f"model.layers.{i}.{k}.weight", float(10 * i + j), (4, 4), 16, "float32")
                       for i in range(3) for j, k in enumerate(("q_proj", "v_proj"))])


def test_policy_validates_at_construction_and_applies_like_select():
    t = _table()
    for kw in (dict(num_tensors=2), dict(top_fraction=0.5), dict(param_budget=0.34), dict(max_kappa=11.0),
               dict(num_tensors=1, group_by="kind")):
        pol = SelectionPolicy(**kw)
        assert pol.apply(t) == t.select(**kw) == t.select(pol)
    assert SelectionPolicy(num_tensors=1, group_by="kind").apply(t) == ["model.layers.0.q_proj.weight",
                                                                        "model.layers.0.v_proj.weight"]
    with pytest.raises(ValueError, match="exactly one selection policy.*got none"):
        SelectionPolicy()
    with pytest.raises(ValueError, match="got num_tensors, max_kappa"):
        SelectionPolicy(num_tensors=1, max_kappa=2.0)
    with pytest.raises(ValueError, match="top_fraction must be in"):
        SelectionPolicy(top_fraction=2)
    with pytest.raises(ValueError, match="group_by must be"):
        SelectionPolicy(num_tensors=1, group_by="colour")
    with pytest.raises(ValueError, match="not both"):
        t.select(SelectionPolicy(num_tensors=1), num_tensors=2)
    pol = SelectionPolicy(param_budget=0.5, group_by="kind")
    assert (pol.name, pol.value, pol.to_dict()) == ("param_budget", 0.5, {"param_budget": 0.5, "group_by": "kind"})
    assert SelectionPolicy.from_options({"max_kappa": 3.0, "other": 1}) == SelectionPolicy(max_kappa=3.0)
    assert SelectionPolicy.from_options({"include": "x"}) is None


def test_name_filter_is_the_one_include_exclude_rule():
    f = NameFilter(include=["q_proj", "v_proj"], exclude="layers\\.0\\.")
    assert f("model.layers.1.q_proj.weight") and not f("model.layers.0.q_proj.weight")
    assert f.reason("model.layers.1.k_proj.weight") == "not included"
    assert f.reason("model.layers.0.v_proj.weight") == "excluded"
    assert NameFilter()("anything") and not NameFilter().active
    with pytest.raises(ValueError, match="--exclude: invalid regular expression"):
        NameFilter(exclude="[", arg_names=("--include", "--exclude"))
    with pytest.raises(TypeError, match="include must be a regex string"):
        NameFilter(include=3)
    # the same rule in the scan and in the table
    model = make_tiny_llama()
    eligible, skipped = filter_refs(model_refs(model), names=f)
    assert all(f(r.name) for r in eligible) and skipped["model.layers.0.self_attn.q_proj.weight"] == "excluded"
    table = kappatune.scan(model, cache=None, progress=False)
    assert table.select(num_tensors=99, include=["q_proj", "v_proj"], exclude="layers\\.0\\.") == \
        [n for n in table.names if f(n)]


def test_float_of_an_entry_is_its_kappa():
    e = KappaEntry("w", 12.5, (2, 2), 4, "float32")
    assert float(e) == 12.5 and math.isnan(float(KappaEntry("u", math.nan, (2, 2), 4, "float32")))


def test_resolve_selection_is_pure_and_matches_the_optimizer(tiny_llama):
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    sel = resolve_selection(tiny_llama, SelectionPolicy(param_budget=0.5, group_by="kind"), cache=None,
                            progress=False)
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())
    ks = [sel.kappas[n] for n in sel.names]
    assert sel.names and sel.policy == SelectionPolicy(param_budget=0.5, group_by="kind") and len(ks) == len(sel.names)
    opt = KappaTuneOptimizer(tiny_llama, torch.optim.SGD, policy=sel.policy, cache=None, progress=False, lr=0.1)
    assert sorted(opt.selected) == sorted(sel.names) and opt.table.names == sel.table.names
    # explicit names: κ from the table, ordered lowest first; a table without a model (the CLI's case)
    explicit = resolve_selection(tiny_llama, names=list(reversed(sel.names)), table=sel.table)
    assert [explicit.kappas[n] for n in explicit.names] == sorted(ks) and set(explicit.names) == set(sel.names)
    assert resolve_selection(None, SelectionPolicy(num_tensors=2), table=sel.table).names == sel.table.names[:2]
    with pytest.raises(ValueError, match="names= is an explicit selection"):
        resolve_selection(tiny_llama, SelectionPolicy(num_tensors=1), names=sel.names)
    with pytest.raises(ValueError, match="needs a model to scan"):
        resolve_selection(None, SelectionPolicy(num_tensors=1))


def test_optimizer_accepts_one_policy_object_or_keywords(tiny_llama):
    with pytest.raises(ValueError, match="not both"):
        KappaTuneOptimizer(tiny_llama, policy=SelectionPolicy(num_tensors=1), num_tensors=2, cache=None)
    with pytest.raises(TypeError, match="policy must be a SelectionPolicy"):
        KappaTuneOptimizer(tiny_llama, policy={"num_tensors": 1}, cache=None)
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_old_spellings_still_work_with_a_future_warning(tiny_llama, tmp_path):
    with pytest.warns(FutureWarning, match="cache_dir= is deprecated, use cache="):
        opt = KappaTuneOptimizer(tiny_llama, torch.optim.SGD, num_tensors=2, cache_dir=tmp_path / "c",
                                 progress=False, lr=0.1)
    assert len(kappatune.KappaCache(tmp_path / "c")) == len(opt.table)  # the old spelling still reaches the cache
    with pytest.warns(FutureWarning, match="opt.table"):
        assert opt.kappas is opt.table


def test_the_wrapper_is_initialised_by_torch(tiny_llama, monkeypatch):
    """Optimizer.__init__ runs on the wrapper: attributes torch sets there (now or in a later torch) exist."""
    real_init = torch.optim.Optimizer.__init__

    def init_with_a_new_attribute(self, params, defaults):
        real_init(self, params, defaults)
        self._a_future_torch_attribute = "set by torch"

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", init_with_a_new_attribute)
    opt = KappaTuneOptimizer(tiny_llama, torch.optim.AdamW, num_tensors=3, cache=None, progress=False, lr=1e-3)
    assert opt._a_future_torch_attribute == "set by torch"
    # torch's resets during its __init__ did not reach the inner optimizer
    assert opt.param_groups is opt.inner.param_groups and len(opt.inner.param_groups) == 1
    assert [p for g in opt.param_groups for p in g["params"]] == [p for g in opt.inner.param_groups
                                                                   for p in g["params"]]
    assert opt.defaults is opt.inner.defaults and opt.defaults["lr"] == 1e-3
    assert opt.state is opt.inner.state
    assert opt._zero_grad_profile_name == "Optimizer.zero_grad#KappaTuneOptimizer.zero_grad"


def test_frozen_tensors_selected_are_logged_or_skipped(tiny_llama, caplog):
    table = kappatune.scan(tiny_llama, cache=None, progress=False)
    lowest = table.names[0]
    dict(tiny_llama.named_parameters())[lowest].requires_grad_(False)
    with caplog.at_level("WARNING", logger="kappatune.optimizer"):
        opt = KappaTuneOptimizer(tiny_llama, torch.optim.SGD, num_tensors=2, table=table, cache=None, lr=0.1)
    assert lowest in opt.selected and "had requires_grad=False and are now trained" in caplog.text
    assert lowest in caplog.text and "skip_frozen=True" in caplog.text
    opt._freeze.restore()
    assert not dict(tiny_llama.named_parameters())[lowest].requires_grad
    skipping = KappaTuneOptimizer(tiny_llama, torch.optim.SGD, num_tensors=2, table=table, cache=None,
                                  skip_frozen=True, lr=0.1)
    assert lowest not in skipping.selected and skipping.selected == table.names[1:3]


# -- the layout rule: one place, same answer for a model and its checkpoint -------------------
class _Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Conv1d(6, 8, 3)          # a Conv1d whose name lacks "conv"
        self.experts_up = nn.Parameter(torch.randn(3, 6, 5))  # a fused stack of matrices


def test_layout_rule_agrees_between_a_model_and_its_checkpoint(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    m = _Mixer()
    refs = {r.name: r for r in model_refs(m)}
    assert refs["mixer.weight"].resolved_layout == "flatten" and refs["experts_up"].resolved_layout == "stack"
    assert default_layout("mixer.weight", (8, 6, 3)) == "flatten" == default_layout("a.conv.x", (8, 6, 3))
    assert default_layout("experts.gate_up_proj", (3, 6, 5)) == "auto"
    assert matrix_dims((8, 6, 3), "flatten") == (8, 18) and matrix_dims((3, 6, 5)) == (6, 5)
    with pytest.raises(ValueError, match="layout='matrix' needs a 2-D tensor"):
        resolve_layout((3, 6, 5), "matrix", name="x")
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    safetensors.save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()},
                          str(ckpt / "model.safetensors"))
    from_model = kappatune.scan(m, cache=tmp_path / "cache", progress=False)
    from_ckpt = kappatune.scan_checkpoint(ckpt, cache=tmp_path / "cache", progress=False)
    for n in ("mixer.weight", "experts_up"):
        assert from_ckpt[n].layout == from_model[n].layout and from_ckpt[n].kappa == from_model[n].kappa
    flat = torch.linalg.svdvals(m.mixer.weight.detach().double().reshape(8, -1))
    assert from_model["mixer.weight"].kappa == pytest.approx(float(flat[0] / flat[-1]), rel=1e-6)


def test_cache_argument_accepts_bytes_and_meta_tensors_get_our_message(tmp_path):
    lin = nn.Linear(6, 4)
    t = kappatune.scan(lin, cache=os.fsencode(str(tmp_path / "c")), progress=False)
    assert len(t) == 1 and len(kappatune.KappaCache(tmp_path / "c")) == 1
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="weight: the tensor is on the meta device"):
        kappatune.scan(meta, cache=tmp_path / "c", progress=False)   # the cache digests first
    with pytest.raises(ValueError, match="meta device"):
        list(lookup(model_refs(meta), kappatune.KappaCache(tmp_path / "c")))


def test_library_progress_bar_is_off_when_stderr_is_not_a_terminal(tmp_path):
    pytest.importorskip("tqdm")
    code = ("import torch, kappatune; kappatune.scan(torch.nn.Linear(8, 8), cache=None); "
            "kappatune.scan(torch.nn.Linear(8, 8), cache=None, progress=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("κ scan") == 1   # only the forced bar drew


# -- tampered optimizer state is refused before anything changes (issue: reliability) ---------
def _tied_model():
    m = make_tiny_llama()
    m.lm_head.weight = m.model.embed_tokens.weight      # tie by hand: two names, one tensor
    return m


def _state(opt):
    return {k: v for k, v in opt.state_dict().items()}


def _snapshot(model, opt):
    return ({n: p.requires_grad for n, p in model.named_parameters()}, list(opt.selected),
            [list(g["params"]) for g in opt.param_groups], {id(p): dict(s) for p, s in opt.state.items()})


@pytest.mark.parametrize("tamper", ["same name twice", "both names of a tied weight", "one tensor in two groups",
                                    "a saved index twice"])
def test_tampered_selection_is_refused_and_nothing_changes(tamper):
    model = _tied_model()
    a, b = "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    names = [a, b] if tamper != "both names of a tied weight" else [a, "model.embed_tokens.weight"]
    opt = KappaTuneOptimizer(model, torch.optim.SGD, names=names, cache=None, progress=False, lr=0.5)
    if tamper == "one tensor in two groups":
        opt.add_param_group({"params": [dict(model.named_parameters())["model.norm.weight"]], "lr": 0.5})
    x = torch.randint(0, 128, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sd = opt.state_dict()
    rec = sd["kappatune"]
    if tamper == "same name twice":
        rec["groups"][0][1] = rec["groups"][0][0]
    elif tamper == "both names of a tied weight":
        rec["groups"][0][1] = "lm_head.weight" if rec["groups"][0][0] == "model.embed_tokens.weight" \
            else "model.embed_tokens.weight"
        rec["groups"][0][0] = "lm_head.weight" if rec["groups"][0][1] == "model.embed_tokens.weight" \
            else "model.embed_tokens.weight"
    elif tamper == "one tensor in two groups":
        rec["groups"][1][0] = rec["groups"][0][0]
    else:
        sd["param_groups"][0]["params"][1] = sd["param_groups"][0]["params"][0]
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="more than once|same parameter index twice"):
        opt.load_state_dict(sd)
    assert _snapshot(model, opt) == before


def test_a_failing_inner_load_puts_everything_back(tiny_llama):
    a, b = "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    c = "model.layers.0.mlp.up_proj.weight"
    opt = KappaTuneOptimizer(tiny_llama, torch.optim.AdamW, names=[a, b], cache=None, progress=False, lr=1e-2)
    x = torch.randint(0, 128, (2, 8))
    tiny_llama(input_ids=x, labels=x).loss.backward()
    opt.step()
    other = KappaTuneOptimizer(make_tiny_llama(), torch.optim.AdamW, names=[c, a], cache=None, progress=False,
                               lr=1e-2)
    sd = other.state_dict()                        # another selection, and no state for it yet: fine to load...
    sd["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}
    sd["param_groups"][0]["lr"] = "not a number"   # ...but this inner state breaks AdamW's own loader
    before = _snapshot(tiny_llama, opt)
    state_obj, groups_obj = opt.inner.state, opt.inner.param_groups
    real = type(opt.inner).load_state_dict

    def failing(self, state_dict):
        real(self, state_dict)
        raise RuntimeError("the inner optimizer failed after partly loading")

    opt.inner.load_state_dict = failing.__get__(opt.inner)
    with pytest.raises(RuntimeError, match="partly loading"):
        opt.load_state_dict(sd)
    assert _snapshot(tiny_llama, opt) == before
    assert opt.inner.state is state_obj and opt.inner.param_groups is groups_obj
    assert not opt._freeze.restored
    opt._freeze.restore()
    assert all(p.requires_grad for p in tiny_llama.parameters())   # the user's flags come back


def test_a_cache_entry_for_another_shape_or_dtype_is_not_used(tmp_path):
    """An entry under the right key but describing another tensor (shape, dtype) is recomputed, not trusted."""
    lin = nn.Linear(6, 4)
    good = kappatune.scan(lin, cache=None, progress=False)["weight"]
    for shape, dtype in (((2, 12), "float32"), ((4, 6), "float16")):
        cache = kappatune.KappaCache(tmp_path / f"c{shape[0]}{dtype}")
        cache.put(kappatune.KappaCache.key(good.digest or kappatune.cache.tensor_digest(lin.weight.detach()), "matrix"),
                  kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=shape, dtype=dtype, layout="matrix")
        cache.save()
        again = kappatune.scan(lin, cache=kappatune.KappaCache(cache.path), progress=False)["weight"]
        assert again.kappa == good.kappa != 2.0


@pytest.mark.parametrize("workers", [1, 2])
def test_numpy_blas_follows_torch_threads_during_the_scan(monkeypatch, workers):
    """One worker under torch.set_num_threads(1) must not run numpy's BLAS on every core (4-6x slower on a
    loaded machine); parallel workers run one BLAS thread each; the settings come back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import sys

    scan_mod = sys.modules["kappatune.pipeline"]

    seen = []
    real = scan_mod._kappa_of

    def spy(ref, tensor=None):
        seen.append({i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"})
        return real(ref, tensor)

    monkeypatch.setattr(scan_mod, "_kappa_of", spy)
    before = threadpoolctl.threadpool_info()
    prev = torch.get_num_threads()
    try:
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            torch.set_num_threads(1)
            kappatune.scan(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), cache=None, progress=False,
                           num_workers=workers)
            assert torch.get_num_threads() == 1
            assert {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"} == {2}
    finally:
        torch.set_num_threads(prev)
    assert seen and all(s <= {1} for s in seen), seen
    assert threadpoolctl.threadpool_info() == before


def test_resolve_selection_names_its_own_arguments(tiny_llama):
    """No policy: the message offers what resolve_selection takes (policy= or names=), not keywords it
    does not accept."""
    with pytest.raises(ValueError, match=r"give a selection policy: .*policy= \(a SelectionPolicy\) or names=") as e:
        resolve_selection(tiny_llama, cache=False)
    assert "num_tensors" not in str(e.value)
    with pytest.raises(TypeError):
        resolve_selection(tiny_llama, num_tensors=1)   # the keywords belong to the table and the optimizer
