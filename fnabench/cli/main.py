"""The ``fnabench`` command: run sweeps, render leaderboards, publish them, make and check baselines.

Exit status, the same for every command (``fnabench._errors``): 0 success; 1 a regression found by
``check``, or a sweep with failed cells (it finishes the others); 2 a usage or input mistake, one line
on stderr naming what is wrong and what is accepted, raised before any work; 3 a bug (traceback).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from fnabench._errors import EXIT_FOUND, EXIT_OK, UserError, guarded, one_line
from fnabench._version import __version__
from fnabench.cli import recall_cmd as recall_cli
from fnabench.cli import tune_cmd
from fnabench.cli.analyze_cmd import add_parser as _add_analyze
from fnabench.cli.analyze_cmd import cmd_analyze
from fnabench.cli.parser import OneLineParser
from fnabench.harness import config as cfg
from fnabench.harness import status
from fnabench.harness.executor import submit
from fnabench.harness.executor_settings import parse_executor
from fnabench.harness.gate import check, load_baseline, make_baseline, save_baseline, tolerance_warnings
from fnabench.harness.leaderboard import FORMATS, render
from fnabench.harness.leaderboard_plot import plot
from fnabench.harness.publish import publish
from fnabench.harness.records import output_path, read_records, require_records
from fnabench.harness.runner import Runner
from fnabench.models.cards import CARDS
from fnabench.models.registry import MODELS
from fnabench.patching.families import support_table
from fnabench.tasks.registry import TASKS
from fnabench.variants.presets import VARIANTS
from fnabench.variants.spec import COMPONENTS, format_value


class UsageError(UserError, ValueError):
    """A bad command-line argument; one line."""


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a sweep (no CONFIG: the offline default sweep) and print its leaderboard")
    p.add_argument("config", nargs="?", help="sweep config (TOML); default: the packaged offline sweep")
    p.add_argument("--out", help="results folder (default: results/<sweep name>)")
    p.add_argument("--models", nargs="+", help="override the config's models")
    p.add_argument("--variants", nargs="+", help="override the config's variants")
    p.add_argument("--tasks", nargs="+", help="override the config's tasks")
    p.add_argument("--image-size", type=int, nargs="+", dest="image_sizes", help="override image sizes (px)")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(cfg.DTYPES))
    p.add_argument("--seed", type=int, nargs="+", dest="seeds")
    p.add_argument("--timing-repeats", type=int)
    p.add_argument("--retime", action="store_true",
                   help="measure latency and memory again for cells already done (metrics and FLOPs kept)")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--offline", dest="offline", action="store_true", default=None,
                     help="never touch the hub (default in the packaged sweep)")
    net.add_argument("--online", dest="offline", action="store_false", help="allow hub downloads")
    p.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")
    p.add_argument("--format", default="github", choices=FORMATS, help="leaderboard format printed at the end")
    p.add_argument("--executor", choices=["inline", "local", "slurm"],
                   help="where cells run: this process (inline, the default), submitit jobs on this machine (local) "
                        "or on SLURM; overrides [executor] kind (extra 'cluster')")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=None,
                      help="wait for the jobs and print the leaderboard (default for local)")
    wait.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return (default for slurm)")


def _add_results_commands(sub) -> None:
    p = sub.add_parser("leaderboard", help="render the leaderboard of a results folder")
    p.add_argument("results", nargs="+", help="results folder(s) or record files")
    p.add_argument("--format", default="github", choices=FORMATS, help="table format")
    p.add_argument("--plot", metavar="STEM", help="also write STEM.png and STEM.svg (accuracy vs GFLOPs)")
    p.add_argument("-o", "--output", help="write the table to this file instead of stdout")
    p.add_argument("--metrics", metavar="A,B", help="metric columns to show (the primary always), e.g. err_k1,err_k2")

    p = sub.add_parser("publish", help="write a leaderboard folder: table, plot, config and records")
    p.add_argument("results")
    p.add_argument("dest", help="e.g. leaderboards/NAME")

    p = sub.add_parser("baseline", help="make a regression baseline from a results folder")
    p.add_argument("results")
    p.add_argument("-o", "--output", required=True, help="e.g. baselines/NAME.json")
    p.add_argument("--tolerance", action="append", default=[], metavar="METRIC=VALUE",
                   help="absolute tolerance for one metric (repeatable)")
    p.add_argument("--default-tolerance", type=float, default=0.01)
    p.add_argument("--speed-tolerance", type=float, default=0.25, help="relative drop allowed in speed-up vs exact")
    p.add_argument("--flops-tolerance", type=float, default=0.001, help="relative change allowed in GFLOPs")

    p = sub.add_parser("check", help="compare a results folder with a baseline; exit 1 on a regression")
    p.add_argument("results")
    p.add_argument("--baseline", required=True)

    p = sub.add_parser("list", help="list registered models, variants, tasks, or the host families fnabench patches")
    p.add_argument("what", choices=["models", "variants", "tasks", "hosts"])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fnabench", description=__doc__.splitlines()[0])

    parser.add_argument("--version", action="version", version=f"fnabench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_results_commands(sub)
    _add_scale_commands(sub)
    _mount_recall(sub)
    _add_analyze(sub)
    return parser


def _add_scale_commands(sub) -> None:
    status.add_parser(sub)
    tune_cmd.add_parser(sub)


def _mount_recall(sub) -> None:
    """``fnabench recall train|eval|plot|report|...``: the recall task suite's commands (cli/recall_cmd.py)."""
    p = sub.add_parser("recall", help="symbolic in-context recall suite: train, eval, plot, report, throughput, icl")
    recall_cli.add_arguments(p.add_subparsers(dest="recall_command", required=True))


def cmd_run(args) -> int:

    config = cfg.load(args.config)
    config = cfg.override(config, out=args.out, models=args.models, variants=args.variants, tasks=args.tasks,
                          image_sizes=args.image_sizes, limit=args.limit, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype, seeds=args.seeds,
                          timing_repeats=args.timing_repeats, offline=args.offline,
                          executor=_executor_table(config.executor, args))
    if config.executor.get("kind", "inline") != "inline":
        return _cmd_run_jobs(config, args)
    summary = Runner(config, quiet=args.quiet, log=lambda s: print(s, file=sys.stderr), retime=args.retime).run()
    print(render(require_records(summary.out), args.format, metrics=config.table_metrics))
    if config.description and args.format in ("github", "markdown"):
        print(config.description.strip() + "\n")  # the config's reading guide, under its table
    print(summary.line())
    return EXIT_OK if summary.ok else EXIT_FOUND


def _executor_table(table: dict, args) -> dict | None:
    """The config's ``[executor]`` table with ``--executor`` / ``--wait`` applied (None: unchanged)."""
    flags = {k: v for k, v in (("kind", args.executor), ("wait", args.wait)) if v is not None}
    return {**table, **flags} if flags else None


def _cmd_run_jobs(config, args) -> int:
    """``run`` through submitit jobs (fnabench.harness.executor): submit, and print the leaderboard if it waited."""

    result = submit(config, parse_executor(config.executor), retime=args.retime)
    records = read_records(result.out, strict=False) if result.out.is_dir() else []
    if (result.waited or not result.jobs) and records:
        print(render(records, args.format, metrics=config.table_metrics))
        if config.description and args.format in ("github", "markdown"):
            print(config.description.strip() + "\n")
    print(result.line())
    return EXIT_OK if result.ok else EXIT_FOUND


def cmd_leaderboard(args) -> int:
    output = output_path(args.output, "--output") if args.output else None
    stem = output_path(args.plot, "--plot") if args.plot else None
    records = require_records(args.results)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    text = render(records, args.format, metrics=metrics)
    if output:
        output.write_text(text + "\n")
    else:
        print(text)
    if stem:
        for path in plot(records, stem):
            print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK


def cmd_publish(args) -> int:
    command = "fnabench " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    dest = publish(args.results, args.dest, command=command)
    print(f"published {dest}")
    return EXIT_OK


def _tolerances(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--tolerance {item!r}: expected METRIC=VALUE with a number, e.g. cos_sim=0.005") \
                from None
        if not eq or not name:
            raise UsageError(f"--tolerance {item!r}: expected METRIC=VALUE")
    return out


def cmd_baseline(args) -> int:
    output = output_path(args.output, "--output")
    baseline = make_baseline(require_records(args.results), tolerances=_tolerances(args.tolerance),
                             default_tolerance=args.default_tolerance, speed_tolerance=args.speed_tolerance,
                             flops_tolerance=args.flops_tolerance)
    for warning in tolerance_warnings(baseline):
        print(f"fnabench baseline: warning: {warning}", file=sys.stderr)
    print(f"wrote {save_baseline(baseline, output)}")
    return EXIT_OK


def cmd_check(args) -> int:
    baseline = load_baseline(args.baseline)
    report = check(require_records(args.results), baseline)
    print(report.render())
    return EXIT_OK if report.ok else EXIT_FOUND


def cmd_list(args) -> int:
    if args.what == "hosts":  # the support table the family contract holds (docs/support.md)
        print(support_table(), end="")
        return EXIT_OK
    registry = {"models": MODELS, "tasks": TASKS, "variants": VARIANTS}[args.what]
    rows = registry.describe()
    if args.what == "variants":
        for name, keys in COMPONENTS.items():
            defaults = ", ".join(f"{k}={format_value(p.default)}" for k, p in keys.items()) or "-"
            print(f"{name:10s} {defaults}")
        print("\npresets:")
    width = max((len(k) for k, _ in rows), default=0)
    for key, help_text in rows:
        print(f"{key:{width}s}  {help_text}")
        if args.what == "tasks":
            print(_task_options_line(key, width))
    if args.what == "models":  # what each offline model is, and the hash of the weights this machine holds
        print("\noffline models:")
        for card in CARDS.values():
            print(card.render())
    return EXIT_OK


def _task_options_line(key: str, indent: int) -> str:
    """The options a task declares (``[task_options."TASK"]`` in a sweep config) and what each accepts."""
    try:
        factory, _ = TASKS.resolve(key if ":" in key else f"{key}:x")
    except (ImportError, UserError) as err:
        return f"{'':{indent}s}  options: unavailable here ({one_line(err)})"
    options = getattr(factory, "options", None)
    if not options:
        return f"{'':{indent}s}  options: not declared"
    return f"{'':{indent}s}  options: " + "; ".join(f"{name} ({opt.accepted})" for name, opt in sorted(options.items()))


COMMANDS = {"run": cmd_run, "leaderboard": cmd_leaderboard, "publish": cmd_publish, "baseline": cmd_baseline,
            "check": cmd_check, "list": cmd_list, "analyze": cmd_analyze, "status": lambda a: a.func(a),
            "tune": lambda a: a.func(a)}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command under the one exit-status rule (module docstring)."""
    args = build_parser().parse_args(argv)
    command = args.func if args.command == "recall" else COMMANDS[args.command]
    return guarded("fnabench", lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
