"""``fnabench analyze``: massive/artifact tokens and attention sinks of a model, the suppression ablation, and
a leaderboard folder of the results through the harness's records and ``publish``.

    fnabench analyze MODEL... [--images SRC...] [--size PX...] [--limit N] [--out DIR]
                     [--ablate massive|artifact|first ...] [--action keys|values] [--layers SLICE]
                     [--publish DEST [--results DIR]] [--config FILE.toml]
    fnabench analyze --from-records RESULTS --publish DEST     # rebuild the tables and README, no models

Per model and size it writes ``OUT/<model-size>/`` (summary.json, CSVs of every number, arrays.npz, the
figures, and per ablation its comparison) and prints the verdict. With ``--publish`` the records of every
analysis and ablation go to ``--results`` (default ``results/<DEST name>``) and are published as ``DEST``
(README table, records/, ``analysis.md`` and, per model, the figures and summary files without the
per-token dumps). A TOML ``--config`` gives the same options by their long names (``models``, ``sizes``,
``ablate``, ...); options on the command line win.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fnabench._errors import EXIT_OK, UserError
from fnabench.adapters import patch
from fnabench.analysis import Thresholds, analyze
from fnabench.analysis.ablation import ablate, mask_spec
from fnabench.analysis.inputs import NAMED_SOURCES, image_files, inputs_for
from fnabench.analysis.outputs import write_ablation, write_report
from fnabench.analysis.results import TABLES, commands, result, settings_of, slug, tables
from fnabench.harness import records as rec
from fnabench.harness.config import DTYPES, check_device, tomllib
from fnabench.harness.publish import publish
from fnabench.harness.suites import store
from fnabench.measure import count_flops
from fnabench.models.loaded import set_offline
from fnabench.models.registry import MODELS, load_model
from fnabench.variants import parse_variant

ANALYSIS_DEFAULTS: dict[str, Any] = {
    "models": [], "images": None, "sizes": [None], "limit": None, "out": None, "ablate": [], "action": ["keys"],
    "layers": ":", "artifact_ratio": 3.0, "massive_ratio": 20.0, "ratios": "2,3,5,10,20,50,100",
    "activation": 100.0, "activation_factor": 1000.0, "sink_share": 0.2, "sink_lift": 2.0, "from_layer": 1,
    "stable": 0.9,
    "batch_size": 8, "device": "cpu", "dtype": "float32", "threads": None, "publish": None, "results": None,
    "online": False, "quiet": False, "examples": 16, "traces": 4,
}
#: config-file keys that are not options: they go to ``publish`` (the README's text and table columns)
PUBLISH_KEYS = ("description", "table_metrics")


class AnalyzeUsageError(UserError, ValueError):
    """A bad ``fnabench analyze`` request; one line."""


def add_parser(sub) -> None:
    """Register ``analyze`` on the ``fnabench`` subparsers."""
    p = sub.add_parser("analyze", help="massive/artifact tokens, attention sinks and the suppression ablation "
                                       "of a model (figures, JSON/CSV, records)")
    p.add_argument("models", nargs="*", help="model names, e.g. offline:dinov2-s, recall:cpu@seed0, "
                                             "open_clip:ViT-L-14@openai")
    p.add_argument("--images", nargs="+", help="packaged (default), synthetic, or image files and folders")
    p.add_argument("--size", nargs="+", type=int, dest="sizes", help="input size(s) in px (default: the model's)")
    p.add_argument("--limit", type=int, help="at most this many inputs")
    p.add_argument("--examples", type=int, help="recall models: haystack examples (default 16)")
    p.add_argument("--traces", type=int, help="recall models: traces per example (default 4)")
    p.add_argument("--out", help="folder for the full outputs (default results/analysis, or DEST with --publish)")
    p.add_argument("--ablate", nargs="+", choices=("massive", "artifact", "first"),
                   help="also remove this kind with the mask variant and compare (first: position 0)")
    p.add_argument("--action", nargs="+", choices=("keys", "values"),
                   help="remove as keys (default) or zero the values; both: each ablation twice")
    p.add_argument("--layers", help="blocks the ablation masks, a slice (default ':', every block)")
    p.add_argument("--artifact-ratio", type=float, help="norm ≥ this × median: artifact (default 3)")
    p.add_argument("--massive-ratio", type=float, help="norm ≥ this × median: massive (default 20)")
    p.add_argument("--ratios", help="report token counts above these ratios (default 2,3,5,10,20,50,100)")
    p.add_argument("--activation", type=float, help="massive activation: |x| above this (default 100)")
    p.add_argument("--activation-factor", type=float, help="... and ≥ this × the median |x| (default 1000)")
    p.add_argument("--sink-share", type=float, help="sink: ≥ this share of one head's attention (default 0.2)")
    p.add_argument("--sink-lift", type=float, help="... and ≥ this × its share under uniform attention (default 2)")
    p.add_argument("--from-layer", type=int, help="classify from this residual state on (default 1)")
    p.add_argument("--stable", type=float, help="stable: same position in ≥ this share of inputs (default 0.9)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"))
    p.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1 on a shared machine)")
    p.add_argument("--publish", metavar="DEST", help="publish the records as a leaderboard folder, e.g. "
                                                     "leaderboards/analysis-offline")
    p.add_argument("--results", help="records folder (default results/<DEST name>)")
    p.add_argument("--from-records", metavar="RESULTS", help="rebuild DEST from these records alone")
    p.add_argument("--config", help="TOML file giving any of these options by long name (models, sizes, ...)")
    p.add_argument("--online", action="store_true", default=None, help="allow hub downloads")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The command line over the config file over the defaults; each checked."""
    given = {k: v for k, v in vars(args).items() if v not in (None, []) and k not in ("func", "command", "config")}
    file: dict[str, Any] = {}
    if args.config:
        try:
            file = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise AnalyzeUsageError(f"--config {args.config}: cannot read it ({err})") from None
        unknown = sorted(set(file) - set(ANALYSIS_DEFAULTS) - set(PUBLISH_KEYS))
        if unknown:
            raise AnalyzeUsageError(f"--config {args.config}: unknown key(s) {', '.join(unknown)}; accepted: "
                                    f"{', '.join(sorted(ANALYSIS_DEFAULTS))}")
        for key, value in file.items():
            if key in PUBLISH_KEYS:
                continue
            default = ANALYSIS_DEFAULTS.get(key)
            if isinstance(default, list) or key in ("images", "sizes"):
                if not isinstance(value, list):
                    raise AnalyzeUsageError(f"--config {args.config}: {key} = {value!r} should be a list")
            elif default is not None and not isinstance(value, type(default)) \
                    and not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                raise AnalyzeUsageError(f"--config {args.config}: {key} = {value!r} should be a "
                                        f"{type(default).__name__}")
    options = {**ANALYSIS_DEFAULTS, **{k: v for k, v in file.items() if k not in PUBLISH_KEYS}, **given}
    options["config"], options["_given"] = args.config, given
    if isinstance(options["ratios"], str):
        try:
            options["ratios"] = tuple(float(x) for x in options["ratios"].split(",") if x.strip())
        except ValueError:
            raise AnalyzeUsageError(f"--ratios {options['ratios']!r}: expected numbers separated by commas") from None
    for key in ("limit", "batch_size", "examples", "traces", "threads"):
        if options[key] is not None and options[key] < 1:
            raise AnalyzeUsageError(f"--{key.replace('_', '-')} must be >= 1, got {options[key]}")
    for size in options["sizes"]:
        if size is not None and size < 1:
            raise AnalyzeUsageError(f"--size must be >= 1 px, got {size}")
    return options


def _command(options: dict[str, Any]) -> str:
    """The analyze command as a README shows it: ``--config FILE`` and what the command line added, or every
    option that differs from its default (long names; output folders and machine settings left out)."""
    if options.get("config"):
        given = options["_given"]
        parts = ["fnabench", "analyze", "--config", options["config"], *given.get("models", []),
                 *_flags(given, skip_defaults=False)]
    else:
        parts = ["fnabench", "analyze", *options["models"], *_flags(options, skip_defaults=True)]
    return " ".join(shlex.quote(p) for p in parts)


def _flags(values: dict[str, Any], *, skip_defaults: bool) -> list[str]:
    parts: list[str] = []
    for key, value in values.items():
        default = ANALYSIS_DEFAULTS.get(key)
        if key == "ratios":
            default = tuple(float(x) for x in default.split(","))
            value = tuple(float(x) for x in value.split(",")) if isinstance(value, str) else value
        if key not in ANALYSIS_DEFAULTS or key in ("models", "out", "results", "quiet", "threads", "online") \
                or value is None or (skip_defaults and value == default):
            continue
        flag = "--" + ("size" if key == "sizes" else key.replace("_", "-"))
        if isinstance(value, bool):
            parts.append(flag)
        elif key == "ratios":
            parts += [flag, ",".join(f"{v:g}" for v in value)]
        elif isinstance(value, (list, tuple)):
            parts += [flag, *(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return parts


def _thresholds(options: dict[str, Any]):
    return Thresholds(artifact_ratio=options["artifact_ratio"], massive_ratio=options["massive_ratio"],
                      ratios=tuple(options["ratios"]), activation=options["activation"],
                      activation_factor=options["activation_factor"], sink_share=options["sink_share"],
                      sink_lift=options["sink_lift"],
                      from_layer=options["from_layer"], stable=options["stable"]).check()


def cmd_analyze(args: argparse.Namespace) -> int:
    options = _options(args)
    if options.get("from_records"):
        if options["models"] or not options["publish"]:
            raise AnalyzeUsageError("--from-records RESULTS rebuilds --publish DEST from records alone; give both, "
                                    "and no models")
        _publish(Path(options["from_records"]), Path(options["publish"]), command=None, config=options["config"])
        return EXIT_OK
    if not options["models"]:
        raise AnalyzeUsageError("give at least one model (e.g. fnabench analyze offline:dinov2-s), or "
                                "--from-records RESULTS --publish DEST")
    return _run(options)


def _check_first(options: dict[str, Any]) -> tuple[Any, Path | None, Path | None, Path | None]:
    """Everything that can be refused before any model loads: thresholds, ablation specs, device, paths."""

    thresholds = _thresholds(options)

    for kind in options["ablate"]:
        for action in options["action"]:
            parse_variant(mask_spec(kind, action, options["layers"], thresholds))
    check_device(options["device"])
    images = options["images"] or []
    if images and not (len(images) == 1 and images[0] in NAMED_SOURCES):
        image_files(images)  # a missing file or an empty folder is refused before any model loads
    for name in options["models"]:
        MODELS.resolve(name)
    publish = Path(options["publish"]) if options["publish"] else None
    if publish is not None:
        rec.output_path(publish, "--publish", folder=True)
    if options["out"]:
        rec.output_path(options["out"], "--out", folder=True)
    out = Path(options["out"]) if options["out"] else (None if publish is not None else Path("results/analysis"))
    results = Path(options["results"]) if options["results"] else (
        Path("results") / publish.name if publish is not None else None)
    return thresholds, publish, out, results


def _run(options: dict[str, Any]) -> int:
    import torch


    thresholds, publish, out, results_dir = _check_first(options)
    set_offline(not options["online"])
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    command = _command(options)
    dtype = DTYPES[options["dtype"]]
    all_results, done = [], set()
    for name in options["models"]:
        for size in options["sizes"]:
            if (name, None) in done:  # a decoder has no input size: once is enough
                continue
            loaded = load_model(name, image_size=size).to(options["device"], dtype)
            inputs = inputs_for(loaded, options["images"], options["limit"], options["examples"], options["traces"])
            size_used = loaded.image_size if loaded.family != "recall" else None
            done.add((name, size_used))
            name_dir = slug(loaded.name, size_used)
            # full outputs (per-token dumps) into --out; a leaderboard folder gets the figures and summaries
            targets = [(out / name_dir, True)] if out is not None else []
            if publish is not None:
                targets.append((publish / name_dir, False))
            common = dict(thresholds=thresholds, batch_size=options["batch_size"], device=options["device"],
                          dtype=dtype, progress=not options["quiet"], name=loaded.name)
            started, t0 = rec.now(), time.perf_counter()
            before = analyze(loaded, inputs.items, **common)
            finished, seconds = rec.now(), time.perf_counter() - t0
            written = write_report(before, targets[0][0], full=targets[0][1], images=inputs.images)
            for folder, full in targets[1:]:
                _copy_figures(written, folder)
                write_report(before, folder, full=full, figures=False)
            _say(f"{loaded.name}{f' at {size_used} px' if size_used else ''}: {before.count} inputs → "
                 f"{', '.join(str(f) for f, _ in targets)}", before.verdict())
            settings = settings_of(before, image_size=size_used, device=options["device"], dtype=options["dtype"],
                                   batch_size=options["batch_size"], limit=options["limit"], options=inputs.options)
            rel = name_dir if publish is not None else None
            flops = _flops(loaded, inputs.items[0][1], "exact", options["device"], dtype)
            all_results.append(result(before, task=inputs.task, settings=settings, flops=flops, started=started,
                                      finished=finished, duration_s=seconds, command=command, folder=rel))
            for kind, action in [(k, a) for k in options["ablate"] for a in options["action"]]:
                started, t0 = rec.now(), time.perf_counter()
                ab = ablate(loaded, inputs.items, kind, action=action, layers=options["layers"], before=before,
                            **common)
                finished, seconds = rec.now(), time.perf_counter() - t0
                written = write_ablation(ab, targets[0][0], images=inputs.images)
                for folder, _ in targets[1:]:
                    _copy_figures(written, folder)
                    write_ablation(ab, folder, figures=False)
                _say(f"  ablation {ab.spec}", ab.verdict())
                flops = _flops(loaded, inputs.items[0][1], ab.spec, options["device"], dtype)
                all_results.append(result(before, task=inputs.task, settings=settings, flops=flops, started=started,
                                          finished=finished, duration_s=seconds, command=command, ablation=ab,
                                          folder=rel))
    if results_dir is not None:
        store(all_results, results_dir)
    if publish is not None:
        assert results_dir is not None
        _publish(results_dir, publish, command=command, config=options["config"])
    return EXIT_OK


def _copy_figures(written: list[Path], folder: Path) -> None:
    """The figures just drawn for one target, copied into another (drawing them twice is the slow part)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for path in written:
        if path.suffix == ".png":
            shutil.copyfile(path, folder / path.name)


def _say(head: str, lines: list[str]) -> None:
    print(head)
    for line in lines:
        print(f"  - {line}")
    sys.stdout.flush()


def _flops(loaded, example, spec: str, device: str, dtype) -> dict[str, Any]:
    """Counted FLOPs of one input's forward under ``spec``."""
    import torch


    if not isinstance(example, torch.Tensor):
        example = loaded.preprocess(example)
    batch = example[None].to(device=device, dtype=dtype if example.is_floating_point() else example.dtype)
    with patch(loaded.model, spec), torch.no_grad():
        count = count_flops(loaded.embed, batch)
    return {"total": int(count.total), "attention": int(count.attention),
            "per": "sequence" if loaded.family == "recall" else "image"}


def _publish(results_dir: Path, dest: Path, *, command: str | None, config: str | None = None) -> Path:
    """``analysis.md`` from the records, then the harness's ``publish`` of the folder (with the analyze config, whose
    ``description`` and ``table_metrics`` the README shows; a folder rebuilt from its records keeps its own)."""

    records = rec.require_records(results_dir)
    dest = rec.output_path(dest, "--publish", folder=True)

    def figures(record: dict) -> list[str]:
        folder = (record.get("analysis") or {}).get("folder")
        if not folder:
            return []
        if record["analysis"]["role"] == "analysis":
            names = ["norms_by_layer.png", "token_norms.png", "sink_share.png"]
        else:
            ab = record["analysis"]["ablation"]
            stem = f"ablation-{ab['kind']}-{ab['action']}"
            names = [f"{stem}.png", f"{stem}-maps.png"]
        return [f"{folder}/{n}" for n in names if (dest / folder / n).is_file()]

    text = tables(records, figures)
    target = dest / TABLES
    if not target.exists() or target.read_text() != text:
        tmp = target.with_name(f".{TABLES}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
    publish(results_dir, dest, command=commands(records) or command, config_path=config)
    print(f"{dest}: README.md and records/ (publish), {TABLES}; records in {results_dir}")
    return dest
