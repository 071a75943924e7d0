"""Command line: ``train``, ``eval``, ``plot``, ``report``, ``throughput``, ``prune``, ``patch``, ``icl`` and
``icl-train`` for the recall suite.

Mounted by the harness as ``fnabench recall <command>`` through :func:`add_arguments` (each command sets
``func``; call ``sys.exit(args.func(args))``), or standalone: ``python -m fnabench.cli.recall_cmd``.
User errors print one line on stderr and exit with status 2 (``fnabench._errors.guarded``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from fnabench._errors import guarded
from fnabench.cli.parser import OneLineParser
from fnabench.harness import suites
from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.evaluate import evaluate_probes, evaluate_run, resolve_eval
from fnabench.tasks.recall.icl import hub_step_revisions, load_task, load_tokenizer, sweep
from fnabench.tasks.recall.icl_toy import ToySettings, train_toy_lm
from fnabench.tasks.recall.interventions import patch_run
from fnabench.tasks.recall.metrics import emergence_point
from fnabench.tasks.recall.plots import plot_circuits, plot_dynamics, plot_emergence, plot_icl, plot_patching
from fnabench.tasks.recall.presets import PRESETS, get_preset
from fnabench.tasks.recall.prune import PRUNE_DIR, PruneSettings, prune_run
from fnabench.tasks.recall.run_config import PROBES, ConfigError, apply_overrides, parse_assignments, read_toml
from fnabench.tasks.recall.run_results import records_from_run, runs_from_records
from fnabench.tasks.recall.tables import circuit_table, ood_table, patching_table, report_files
from fnabench.tasks.recall.training import measure_throughput, set_threads, train

PROG = "fnabench recall"

# ---------------------------------------------------------------------------------------------- commands


def _config_from_args(args):
    if args.config:
        raw = read_toml(args.config)
        base = get_preset(raw.get("preset", args.preset or "medium"))
        config = apply_overrides(base, raw)
    else:
        config = get_preset(args.preset or "medium")
    overrides = parse_assignments(args.set or [])
    if args.seed is not None:
        overrides.setdefault("train", {})["seed"] = str(args.seed)
    if args.steps is not None:
        overrides.setdefault("train", {})["steps"] = str(args.steps)
    return apply_overrides(config, overrides).validate()


def _cmd_train(args) -> int:

    set_threads(args.threads)
    out = Path(args.out) if args.out else None
    given = args.preset or args.config or args.set or args.seed is not None or args.steps is not None
    if out is not None and rundir.is_run(out) and not given:
        config = None  # plain resume
    else:
        config = _config_from_args(args)
        if out is None:
            out = Path("runs") / "recall" / f"{config.preset}-seed{config.train.seed}"
    on_checkpoint = _live_eval(out, args.quiet) if args.eval else None
    try:
        result = train(out, config, until_step=args.until_step, progress=not args.quiet, on_checkpoint=on_checkpoint)
    except KeyboardInterrupt:
        print(f"{PROG} train: stopped; run the same command to resume from {out}", file=sys.stderr)
        return 130
    print(f"{out}: step {result.step} ({result.examples:,} examples, {result.flops / 1e9:,.1f} training GFLOPs, "
          f"{result.seconds:.0f} s), loss {result.loss:.4f}, {result.tokens_per_s:,.0f} tokens/s this session")
    return 0


def _live_eval(out: Path, quiet: bool) -> Callable[[int], None]:
    def evaluate_now(step: int) -> None:
        summary = evaluate_run(out, steps=[step], progress=False)
        if not quiet:
            errs = " ".join(f"k={k} {c['median'][-1]:.3f}" for k, c in summary["model"]["final"].items())
            print(f"\n[eval step {step}] {errs}", file=sys.stderr)

    return evaluate_now


def _eval_cfg(args, config):
    return resolve_eval(config, haystack=args.haystack, needle=args.needle, segment_obs=args.segment_obs,
                        examples=args.examples, traces=args.traces)


def _cmd_eval(args) -> int:

    set_threads(args.threads)
    for run in args.run_dirs:
        config = rundir.load_config(run)
        cfg = _eval_cfg(args, config)
        for probe in args.probe or ["none"]:
            summary = evaluate_run(run, cfg, probe, progress=not args.quiet)
            print(_emergence_line(run, summary))
        if args.ood:
            probes = evaluate_probes(run, cfg, progress=not args.quiet)
            text = ood_table([(str(run), probes)])
            rundir.atomic_write_text(Path(run) / "ood.md", text)
            print(text)
    return 0


def _emergence_line(run, summary: dict) -> str:
    parts = []
    for k in ("2", "1"):
        point = summary["emergence"].get(k)
        if point is None:
            continue
        examples = emergence_point(point)
        where = "never" if examples is None else f"{examples:,} examples"
        parts.append(f"k={k} emerges at {where} (final err {summary['model']['final'][k]['median'][-1]:.3f})")
    probe = "" if summary["probe"] == "none" else f" probe={summary['probe']}"
    return f"{run} [{summary['task']}{probe}]: " + "; ".join(parts)


def _main_summaries(run_dirs, quiet: bool) -> list[tuple[str, dict]]:

    out = []
    for run in run_dirs:
        config = rundir.load_config(run)
        out.append((f"{config.preset} seed {config.train.seed}", evaluate_run(run, progress=not quiet)))
    return out


def _cmd_plot(args) -> int:
    runs = _main_summaries(args.run_dirs, args.quiet)
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "dynamics.png"
    plot_dynamics(runs, out, ks=args.ks.split(",") if args.ks else None)
    print(out)
    return 0


def _cmd_report(args) -> int:
    set_threads(args.threads)
    if bool(args.run_dirs) == bool(args.from_records):
        raise ConfigError("report takes RUN_DIR... or --from-records RESULTS, not both or neither")
    out = Path(args.out_dir)
    if args.from_records:  # rebuild a leaderboard folder from its records: no run directories needed
        results_dir = Path(args.from_records)
        runs = runs_from_records(suites.require_records(results_dir))
        summaries = None
    else:
        # a bad run folder is refused before anything is made
        summaries = _main_summaries(sorted(args.run_dirs, key=_run_order), args.quiet)
        for run in args.run_dirs:
            evaluate_probes(run, progress=not args.quiet)
            if not args.no_patch:
                patch_run(run)
        results_dir = Path(args.results) if args.results else Path("results") / out.name
        suites.store([rec for r in args.run_dirs for rec in records_from_run(r)], results_dir)
        runs = runs_from_records(suites.require_records(results_dir))
    out = suites.output_path(out, "--out-dir", folder=True)
    unfinished = {run["label"] for run in runs if not run["finished"]}
    for run in runs:
        if run["label"] in unfinished:
            print(f"{PROG} report: warning: {run['label']} is unfinished (last checkpoint step {run['steps_done']:,} "
                  f"of {run['steps_planned']:,}); the tables mark it and leave it out of the cross-seed summaries",
                  file=sys.stderr)
    tables = report_files(runs)
    for name, text in tables.items():
        rundir.atomic_write_text(out / name, text)
    pictures = []
    if summaries is None:  # from records: the curves their records hold (records made before curves were kept lack it)
        summaries = [(run["label"], run["summary"]) for run in runs if len(run["summary"]["steps"]) > 1]
        missing = [run["label"] for run in runs if len(run["summary"]["steps"]) < 2]
        if missing:
            print(f"{PROG} report: warning: the records of {', '.join(missing)} hold no curve over checkpoints "
                  "(made before records kept it); the figures leave them out", file=sys.stderr)
    if summaries:
        plot_dynamics(summaries, out / "dynamics.png")
        plot_emergence([(label + (" (unfinished)" if label in unfinished else ""), summary)
                        for label, summary in summaries], out / "emergence.png")
        pictures += ["dynamics.png", "emergence.png"]
    pictures += _intervention_pictures(runs, out)
    (out / "records.jsonl").unlink(missing_ok=True)  # what report wrote before its records went through publish
    suites.publish(results_dir, out, command=_report_command(args))
    print(f"{out}: README.md and records/ (publish), {', '.join([*tables, *pictures])}; records in {results_dir}")
    return 0


def _intervention_pictures(runs: list[dict], out: Path) -> list[str]:
    """``patching.png`` (each run's label-swap patching) and ``circuits-sS.png`` (a row of circuits per run)."""
    made = []
    for run in runs:
        if run.get("patching"):
            name = f"patching-seed{run['config'].train.seed}.png"
            plot_patching(run["patching"], out / name, title=run["label"])
            made.append(name)
    for sparsity in sorted({s for run in runs for s in run.get("circuits", {})}):
        grid = [[(f"{run['label']}: {t} circuit, {c['edges_kept']}/{c['edges_total']} edges", c)
                 for t, c in run["circuits"][sparsity].items()] for run in runs if sparsity in run.get("circuits", {})]
        name = f"circuits-s{sparsity:g}.png"
        plot_circuits(grid, out / name)
        made.append(name)
    return made


def _run_order(run) -> tuple:
    config = rundir.load_config(run)
    return config.preset, config.train.seed, str(run)


def _report_command(args) -> str:
    """The command that made the folder, as its README shows it (from the arguments, not the process's argv)."""
    parts = ["fnabench", "recall", "report"]
    parts += [f"--from-records={args.from_records}"] if args.from_records else [str(r) for r in args.run_dirs]
    if args.results and not args.from_records:
        parts.append(f"--results={args.results}")
    parts.append(f"--out-dir={args.out_dir}")
    return " ".join(shlex.quote(p) for p in parts)


def _cmd_throughput(args) -> int:
    set_threads(args.threads)
    for name in args.presets:
        r = measure_throughput(get_preset(name), args.batch, args.steps)
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s ({r['examples_per_s']:.1f} examples/s) at batch "
              f"{r['batch']}, {r['step_seconds'] * 1e3:.0f} ms/step ({r['data_seconds'] * 1e3:.0f} ms data), "
              f"{r['parameters']:,} parameters, {r['threads']} thread(s)")
    return 0


#: keys an ``icl --config`` TOML may set (its [icl] table), each also a command-line option that overrides it
ICL_KEYS = ("model", "task", "shots", "max_examples", "input_prefix", "output_prefix", "device", "dtype",
            "every", "cache_dir", "out", "tokenizer", "evict")


def _icl_settings(args) -> dict:
    settings: dict = {}
    if args.config:
        raw = read_toml(args.config)
        table = raw.get("icl", raw)
        unknown = sorted(set(table) - set(ICL_KEYS))
        if unknown:
            raise ConfigError(f"{args.config}: unknown [icl] key(s) {', '.join(unknown)}; valid: {', '.join(ICL_KEYS)}")
        settings.update(table)
    for key in ICL_KEYS:
        value = getattr(args, key if key != "model" else "all_steps", None)
        if value is not None:
            settings[key] = value
    for key in ("task", "out"):
        if not settings.get(key):
            raise ConfigError(f"icl needs --{key} (or '{key}' in --config)")
    return settings


def _cmd_icl(args) -> int:

    s = _icl_settings(args)
    task = load_task(s["task"], s.get("input_prefix"), s.get("output_prefix"))
    checkpoints = list(args.checkpoints or [])
    if s.get("model"):
        checkpoints += hub_step_revisions(s["model"], int(s.get("every", 1)))
    if not checkpoints:
        raise ConfigError("give checkpoints (directories or HUB_ID@REVISION) or --all-steps HUB_ID")
    out = Path(s["out"])
    tokenizer = load_tokenizer(s["tokenizer"], s.get("cache_dir")) if s.get("tokenizer") else None

    def show(row: dict) -> None:
        if not args.quiet:
            print(f"{row['checkpoint']}: first {row['first_accuracy']:.3f}, second {row['second_accuracy']:.3f}",
                  file=sys.stderr)

    rows = sweep(checkpoints, task, tokenizer=tokenizer, shots=int(s.get("shots", 1)),
                 max_examples=s.get("max_examples"), device=s.get("device", "cpu"), dtype=s.get("dtype", "float32"),
                 cache_dir=s.get("cache_dir"), out=out, refresh=args.refresh, evict=bool(s.get("evict")),
                 progress=show)
    rows = sorted(rows, key=lambda row: (row["tokens"] is None, row["tokens"] or 0, row["step"]))
    rundir.write_json(out / "icl.json", rows)
    plot_icl(rows, out / "icl.png", title=f"first vs second target token: {Path(s['task']).parent.name or s['task']}")
    for row in rows:
        tokens = "" if row.get("tokens") is None else f", {row['tokens']:,} tokens"
        print(f"step {row['step']}{tokens}: first {row['first_accuracy']:.3f} (n={row['n_first']}), "
              f"second {row['second_accuracy']:.3f} (n={row['n_second']})")
    return 0


def _cmd_icl_train(args) -> int:

    set_threads(args.threads)
    settings = ToySettings(steps=args.steps, save_every=args.save_every, seed=args.seed)
    folders = train_toy_lm(args.out, settings, progress=not args.quiet)
    print(f"{args.out}: {len(folders)} checkpoints ({folders[0].name} … {folders[-1].name}) and task.json; sweep "
          f"them with: fnabench recall icl {args.out}/step* --task {args.out}/task.json --out OUT")
    return 0


def _prune_settings(args, sparsity: float):
    sizes = {k: getattr(args, k) for k in ("examples", "traces", "test_examples", "test_traces", "batch")
             if getattr(args, k) is not None}
    return PruneSettings(sparsity=sparsity, steps=args.steps, lr=args.lr, lambda_lr=args.lr, seed=args.seed,
                         **sizes).validate()


def _cmd_prune(args) -> int:

    set_threads(args.threads)
    targets = args.target or ["k1", "k2"]
    for run in args.run_dirs:
        config = rundir.load_config(run)
        for sparsity in args.sparsity:
            settings = _prune_settings(args, sparsity)
            circuits = {}
            for target in targets:
                def show(h, target=target, run=run):
                    if not args.quiet:
                        print(f"[{run} {target} step {h['step']}] faithfulness MSE {h['faithful_mse']:.4f}, "
                              f"expected sparsity {h['expected_sparsity']:.3f} (target {h['target_sparsity']:.3f})",
                              file=sys.stderr)

                circuits[target] = prune_run(run, target, settings, step=args.step, refresh=args.refresh,
                                             progress=show)
            step = next(iter(circuits.values()))["step"]
            folder = Path(run) / PRUNE_DIR / f"step{step}"
            label = f"{config.preset} seed {config.train.seed}"
            picture = plot_circuits([[(f"{label}: {t} circuit, {c['edges_kept']}/{c['edges_total']} edges", c)
                                      for t, c in circuits.items()]], folder / f"circuits-s{sparsity:g}.png")
            table = circuit_table([(label, circuits)])
            rundir.atomic_write_text(folder / f"circuits-s{sparsity:g}.md", table)
            print(table)
            print(picture)
    return 0


def _cmd_patch(args) -> int:

    set_threads(args.threads)
    for run in args.run_dirs:
        result = patch_run(run, args.examples, args.traces, step=args.step, refresh=args.refresh)
        print(patching_table(result["rows"]))
        print(plot_patching(result["rows"], Path(run) / "patching.png", title=f"{run} at step {result['step']}"))
    return 0


# ---------------------------------------------------------------------------------------------- parser


def add_arguments(subparsers) -> None:
    """Register the suite's commands (module docstring) on an argparse subparsers."""
    p = subparsers.add_parser("train", help="train (or resume) a recall model",
                              description="Train a GPT-2 on interleaved traces; resumes when OUT holds the run.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named configuration (default: medium)")
    p.add_argument("--config", help="TOML config (optional 'preset' key, then [data] [model] [train] [eval])")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--seed", type=int, help="training seed (init and data order)")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--out", help="run directory (default runs/recall/PRESET-seedSEED)")
    p.add_argument("--until-step", type=int, help="stop at this step (resumable), e.g. to split a run")
    p.add_argument("--eval", action="store_true", help="evaluate each checkpoint as it is saved")
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("eval", help="evaluate every checkpoint of runs on recall queries")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--haystack", type=int, help="haystack systems H (default: the run's)")
    p.add_argument("--needle", type=int, help="needle position c in [0, H)")
    p.add_argument("--segment-obs", type=int, help="observations per haystack segment")
    p.add_argument("--examples", type=int, help="haystack examples")
    p.add_argument("--traces", type=int, help="traces per example")
    p.add_argument("--probe", action="append", choices=PROBES, help="query variant (repeatable; default none)")
    p.add_argument("--ood", action="store_true", help="also every probe at the last checkpoint → RUN_DIR/ood.md")
    _common(p)
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser("plot", help="training-dynamics plot (error vs training examples)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG path (default RUN_DIR/dynamics.png)")
    p.add_argument("--ks", help="comma-separated k values to draw (default 1,2,3,8 where evaluated)")
    _common(p)
    p.set_defaults(func=_cmd_plot)

    p = subparsers.add_parser("report", help="leaderboard folder: records and table (publish), plots, emergence and "
                                             "OOD tables, preset",
                              description="Evaluate runs, store one harness record per evaluation in a results "
                                          "folder and publish it (README table, records/), with the emergence, "
                                          "OOD, patching and circuit tables, the dynamics and emergence plots and "
                                          "the preset beside it; or rebuild such a folder from its records alone "
                                          "(the figures from the curves the records hold). Cross-seed summaries "
                                          "are over finished runs only (last checkpoint at the configured steps, "
                                          "as each record says).")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--out-dir", required=True, help="folder to write (e.g. leaderboards/recall-cpu)")
    p.add_argument("--results", help="results folder for the records (default results/NAME of --out-dir)")
    p.add_argument("--from-records", metavar="RESULTS",
                   help="rebuild from these records instead of run dirs (e.g. leaderboards/recall-cpu/records)")
    p.add_argument("--no-patch", action="store_true", help="skip the token-swap patching of each run's last checkpoint")
    _common(p)
    p.set_defaults(func=_cmd_report)

    p = subparsers.add_parser("throughput", help="training tokens/s of presets on this machine")
    p.add_argument("presets", nargs="+", choices=sorted(PRESETS), metavar="PRESET")
    p.add_argument("--batch", type=int, help="micro-batch to time (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    _common(p)
    p.set_defaults(func=_cmd_throughput)

    p = subparsers.add_parser("icl", help="first- vs second-token ICL accuracy over LM checkpoints",
                              description="Greedy first-token and (true first given) second-token accuracy of a "
                                          "BIG-bench-format task over checkpoints: local folders, HUB_ID@REVISION, "
                                          "or every step* branch of a hub model (--all-steps). One record per "
                                          "checkpoint in OUT/revisions/ (an interrupted sweep resumes), icl.json "
                                          "and icl.png (accuracy vs training tokens).")
    p.add_argument("checkpoints", nargs="*", help="local model directories or HUB_ID@REVISION")
    p.add_argument("--config", help="TOML with an [icl] table (keys: " + ", ".join(ICL_KEYS) + ")")
    p.add_argument("--task", help="BIG-bench-format JSON of input/target examples")
    p.add_argument("--all-steps", metavar="HUB_ID", help="add every step* branch of this hub model")
    p.add_argument("--every", type=int, help="with --all-steps: every n-th revision (and the last)")
    p.add_argument("--shots", type=int, help="worked pairs before each query (default 1)")
    p.add_argument("--max-examples", type=int, help="use only the first N examples")
    p.add_argument("--input-prefix", help="text before each input (default: the JSON's, else '\\nQ: ')")
    p.add_argument("--output-prefix", help="text before each target (default: the JSON's, else '\\nA: ')")
    p.add_argument("--tokenizer", help="tokenizer folder or HUB_ID@REVISION (default: the first checkpoint's)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights' dtype (default float32)")
    p.add_argument("--cache-dir", help="transformers download cache (default: its own, HF_HOME)")
    p.add_argument("--out", help="folder for revisions/, icl.json and icl.png")
    p.add_argument("--evict", action="store_true", default=None,
                   help="delete each hub revision from the download cache after its record is written")
    p.add_argument("--refresh", action="store_true", help="measure checkpoints that already have a record again")
    p.add_argument("--quiet", action="store_true", help="no per-checkpoint lines while sweeping")
    p.set_defaults(func=_cmd_icl)

    p = subparsers.add_parser("icl-train", help="train the toy transliteration LM with checkpoints (offline ICL)",
                              description="Train a character-level GPT-2 on a generated transliteration-style task "
                                          "(toy IPA and spelling, each behind its marker) and save it every N steps "
                                          "as OUT/stepS-tokensT/ transformers folders, with the held-out task as "
                                          "OUT/task.json: local checkpoints for `recall icl`.")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=_cmd_icl_train)

    p = subparsers.add_parser("prune", help="edge pruning: circuits for recall (k1) and continuation (k2)",
                              description="Find the edges (writer → reader on the disentangled residual stream) "
                                          "each prediction needs at a run's checkpoint: hard-concrete gates, a "
                                          "Lagrangian target sparsity, gated-off edges fed from a run with the "
                                          "label (k1) or the first resumed observation (k2) swapped. Reports edges "
                                          "kept, faithfulness, cross-ablation and overlap; stored under "
                                          "RUN/prune/stepS/ with a picture of the circuits.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--target", action="append", choices=("k1", "k2"), help="repeatable (default both)")
    p.add_argument("--sparsity", type=float, nargs="+", required=True, help="target edge sparsity (e.g. 0.9)")
    p.add_argument("--step", type=int, help="checkpoint (default the last)")
    p.add_argument("--steps", type=int, default=1500, help="optimisation steps (default 1500)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of the gates and multipliers")
    p.add_argument("--batch", type=int, help="queries per optimisation step (default 64)")
    p.add_argument("--examples", type=int, help="training haystack examples (default 32)")
    p.add_argument("--traces", type=int, help="traces per training example (default 32)")
    p.add_argument("--test-examples", type=int, help="held-out haystack examples for the scores (default 16)")
    p.add_argument("--test-traces", type=int, help="traces per held-out example (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refresh", action="store_true", help="search again even if the circuit is stored")
    _common(p)
    p.set_defaults(func=_cmd_prune)

    p = subparsers.add_parser("patch", help="token-swap activation patching per layer at the label position",
                              description="Swap the query's label (or its first resumed observation) to another "
                                          "haystack system's, and write the swapped run's residual stream at that "
                                          "position into the clean run, one layer at a time: k = 1 and k = 2 errors "
                                          "against the needle and the other system (RUN/eval/patching/).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--examples", type=int, help="haystack examples (default: as stored, else 16)")
    p.add_argument("--traces", type=int, help="traces per example (default: as stored, else 64)")
    p.add_argument("--step", type=int, help="checkpoint (default the last)")
    p.add_argument("--refresh", action="store_true")
    _common(p)
    p.set_defaults(func=_cmd_patch)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch (e.g. 1 on a shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser (``python -m fnabench.cli.recall_cmd``)."""
    parser = OneLineParser(prog=PROG, description="Symbolic in-context recall task suite (arXiv:2507.01414).")
    add_arguments(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return guarded(PROG, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
