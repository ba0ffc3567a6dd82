"""KappaTuneOptimizer inside real training stacks: HF Trainer (both routes + resume), accelerate, torch.compile."""

import pytest
import torch
from torch import nn

import kappatune
from kappatune import KappaTuneOptimizer

from .conftest import make_tiny_llama

VOCAB, SEQ = 128, 16


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_only_selected_changed(model, before, selected):
    sel = set(selected)
    assert sel
    for n, p in model.named_parameters():
        if n in sel:
            assert not torch.equal(p, before[n]), f"selected {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.fixture
def _fresh_accelerate():
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# -- Hugging Face Trainer ---------------------------------------------------------------------------
def _dataset(n=16, seed=0):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _trainer(model, out, max_steps=4, **kw):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="linear", save_strategy="steps", save_steps=2, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, save_only_model=False)
    return transformers.Trainer(model=model, args=args, train_dataset=_dataset(), **kw)


def _trained_opt(trainer):
    opt = trainer.optimizer
    while not isinstance(opt, KappaTuneOptimizer):  # accelerate's AcceleratedOptimizer wraps it
        opt = opt.optimizer
    return opt


def test_trainer_optimizers_route_trains_selection_and_resumes_bit_for_bit(tmp_path, _fresh_accelerate):
    model = make_tiny_llama(seed=0)
    before = _snapshot(model)
    opt = KappaTuneOptimizer(model, torch.optim.AdamW, top_fraction=0.25, lr=1e-2, weight_decay=0.1,
                             cache=None, progress=False)
    tr = _trainer(model, tmp_path / "run", optimizers=(opt, None))
    tr.train()
    assert _trained_opt(tr) is opt
    _check_only_selected_changed(model, before, opt.selected)
    sched = tr.lr_scheduler
    assert opt.inner.param_groups[0]["lr"] == sched.get_last_lr()[0] == 0.0  # linear decay reached the inner
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].item() == 4

    # resume from step 2 with an optimizer built for *other* tensors: the checkpoint's selection wins
    resumed = make_tiny_llama(seed=0)
    other = [n for n, p in resumed.named_parameters() if p.ndim == 2 and n not in opt.selected][:1]
    opt2 = KappaTuneOptimizer(resumed, torch.optim.AdamW, names=other, lr=1e-2, weight_decay=0.1, cache=None)
    tr2 = _trainer(resumed, tmp_path / "resumed", optimizers=(opt2, None))
    tr2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert opt2.selected == opt.selected
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == set(opt.selected)
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_trainer_optimizer_cls_and_kwargs_with_model(tmp_path, _fresh_accelerate):
    """Trainer.create_optimizer calls the class with the model when the kwargs carry 'model'."""
    model = make_tiny_llama(seed=1)
    before = _snapshot(model)
    kwargs = {"model": model, "optimizer": torch.optim.AdamW, "num_tensors": 3, "lr": 1e-2,
              "weight_decay": 0.1, "cache": None, "progress": False}
    tr = _trainer(model, tmp_path / "run", max_steps=2, optimizer_cls_and_kwargs=(KappaTuneOptimizer, kwargs))
    tr.train()
    opt = _trained_opt(tr)
    assert len(opt.selected) == 3 and opt.model is model
    _check_only_selected_changed(model, before, opt.selected)
    assert opt.inner.param_groups[0]["lr"] == tr.lr_scheduler.get_last_lr()[0] < 1e-2


def test_trainer_factory_route_selects_before_wrapping(tmp_path, _fresh_accelerate):
    from kappatune.integrations.transformers import KappaTuneOptimizerFactory, optimizer_cls_and_kwargs

    model = make_tiny_llama(seed=2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="Invalid weight_decay value"):  # bad kwargs fail now, not in train()
        optimizer_cls_and_kwargs(model, torch.optim.AdamW, num_tensors=3, weight_decay=-1.0, cache=None)
    cls, kwargs = optimizer_cls_and_kwargs(model, torch.optim.AdamW, param_budget=0.2, lr=1e-2, cache=None,
                                           progress=False)
    assert cls is KappaTuneOptimizerFactory
    selected = kwargs["names"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(selected)  # frozen already
    tr = _trainer(model, tmp_path / "run", optimizer_cls_and_kwargs=(cls, kwargs))
    tr.train()
    opt = _trained_opt(tr)
    assert opt.selected == selected and opt.table.names == kappatune.scan(before, cache=False, progress=False).names
    _check_only_selected_changed(model, before, selected)
    sd = torch.load(tmp_path / "run" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert sd["kappatune"]["groups"] == [selected]


# -- accelerate ---------------------------------------------------------------------------------
def test_accelerate_prepare_accumulation_bf16_matches_the_bare_optimizer(_fresh_accelerate):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision="bf16")
    data = torch.randint(0, VOCAB, (16, SEQ), generator=torch.Generator().manual_seed(0))
    model, ref = make_tiny_llama(seed=3), make_tiny_llama(seed=3)
    before = _snapshot(model)
    opt = KappaTuneOptimizer(model, torch.optim.AdamW, num_tensors=4, lr=1e-2, weight_decay=0.1, cache=None,
                             progress=False)
    kappatune.freeze_all_but(ref, opt.selected)
    named = dict(ref.named_parameters())
    bare = torch.optim.AdamW([named[n] for n in opt.selected], lr=1e-2, weight_decay=0.1)
    for m, o in ((model, opt), (ref, bare)):
        sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
        pm, po, dl, ps = acc.prepare(m, o, DataLoader(TensorDataset(data), batch_size=2), sched)
        assert po.optimizer is o and po.param_groups is o.param_groups
        for (x,) in dl:
            with acc.accumulate(pm):
                acc.backward(pm(input_ids=x, labels=x).loss)
                po.step()
                ps.step()
                po.zero_grad()
        acc.free_memory()
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].item() == 4  # 8 micro-batches / 2
    assert opt.param_groups[0]["lr"] == 1e-2 * 0.5 ** 4
    _check_only_selected_changed(model, before, opt.selected)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


# -- torch.compile --------------------------------------------------------------------------------
def test_torch_compile_keeps_selection_and_stepping(monkeypatch, tmp_path):
    """A compiled model: names come from the inner module, frozen tensors stay frozen.

    Kept cheap: a bias-free linear stack, whose graph inductor lowers to library matmuls
    without building C++ kernels (a cold C++ build takes about a minute on 2 cores).
    """
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._dynamo
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False), nn.Linear(32, 8, bias=False))
    compiled = torch.compile(model)
    before = _snapshot(model)
    opt = KappaTuneOptimizer(compiled, torch.optim.AdamW, num_tensors=1, lr=1e-2, weight_decay=0.1, cache=None,
                             progress=False)
    assert opt.selected[0] in {"0.weight", "1.weight", "2.weight"}
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    try:
        for _ in range(3):
            compiled(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    except Exception as e:  # inductor needs a working C++ toolchain
        if "inductor" in type(e).__module__ or "Compiler" in type(e).__name__ or "_dynamo" in type(e).__module__:
            pytest.skip(f"inductor cannot compile on this machine: {type(e).__name__}: {str(e).splitlines()[0]}")
        raise
    finally:
        torch._dynamo.reset()
    _check_only_selected_changed(model, before, opt.selected)
    assert opt.state_dict()["kappatune"]["groups"] == [opt.selected]
