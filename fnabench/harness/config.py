"""Sweep configs: a TOML file (or the packaged default) plus CLI overrides, validated up front.

Every problem is one :class:`ConfigError` line naming the key and what is accepted, raised before
any model loads, so a typo never costs a half-run sweep.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fnabench._errors import ConfigError
from fnabench._extras import MissingExtraError
from fnabench._registry import RegistryError
from fnabench.harness.executor_settings import parse_executor
from fnabench.models.registry import MODELS
from fnabench.tasks.base import TaskError
from fnabench.tasks.registry import make_task
from fnabench.variants import SpecError, parse_variant
from fnabench.variants.presets import expand_variant

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_CONFIG = "default_sweep.toml"


@dataclass
class SweepConfig:
    """What a sweep runs: the grid (models × image sizes × tasks × variants × seeds) and its settings."""

    name: str = "sweep"
    description: str = ""  # Markdown; `fnabench publish` puts it under the leaderboard's title
    models: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=lambda: ["exact"])
    tasks: list[str] = field(default_factory=list)
    image_sizes: list[int | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    limit: int | None = None
    timing_repeats: int = 5
    timing_warmup: int = 1
    offline: bool = True
    out: str | None = None
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: metric columns the printed and published tables show (the primary always); records keep every metric
    table_metrics: list[str] | None = None
    #: where the cells run: the ``[executor]`` table (fnabench.harness.executor: this process, local jobs, SLURM)
    executor: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # where the config came from (for records and publish)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def canonical_variants(self, *, causal: bool | Callable[[str], bool] = False) -> list[str]:
        """Variant specs in canonical form, exact first (speed ratios need it), duplicates removed.

        With ``causal`` (or where ``causal(spec)`` says so), each in the form it runs in a decoder
        (Variant.for_causal): resolved from the spec as written, so a selector the spec names stays, and
        one it leaves out becomes causal-safe.
        """
        out: list[str] = []
        for spec in self.variants:
            variant = parse_variant(expand_variant(spec))
            on_causal = causal(spec) if callable(causal) else causal
            canon = (variant.for_causal() if on_causal else variant).canonical
            if canon not in out:
                out.append(canon)
        exact = parse_variant("exact").canonical
        return sorted(out, key=lambda c: c != exact)

    def output_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / self.name


_KEYS = {f.name for f in fields(SweepConfig)} - {"source"}
_ALIASES = {"image_size": "image_sizes", "seed": "seeds", "model": "models", "variant": "variants", "task": "tasks"}


def _as_list(key: str, value: Any, kind: type | tuple[type, ...]) -> list:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, kind) or (isinstance(item, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(f"config key {key!r}: {item!r} is not a {names}")
    return items


#: scalar config keys and the TOML types they take (a string "yes" is not a boolean)
_SCALARS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"), "description": ((str,), "a string (Markdown)"),
    "batch_size": ((int,), "an integer >= 1"), "device": ((str,), "a string: cpu, cuda or cuda:N"),
    "dtype": ((str,), f"one of {', '.join(DTYPES)}"), "limit": ((int, type(None)), "an integer >= 1"),
    "timing_repeats": ((int,), "an integer >= 1"), "timing_warmup": ((int,), "an integer >= 0"),
    "offline": ((bool,), "true or false"), "out": ((str, type(None)), "a folder path (string)"),
    "task_options": ((dict,), "a table of tables, one per task"),
    "executor": ((dict,), "a table ([executor]: kind, partition, gpus_per_job, ...)"),
}


def from_dict(data: dict[str, Any], source: str | None = None, *, here: bool = True) -> SweepConfig:
    """Build and validate a config from parsed TOML (or any dict with the same keys)."""
    where = f"{source}: " if source else ""
    values: dict[str, Any] = {}
    for key, value in data.items():
        target = _ALIASES.get(key, key)
        if target not in _KEYS:
            raise ConfigError(f"{where}unknown config key {key!r}; accepted: {', '.join(sorted(_KEYS))}")
        values[target] = value
    try:
        for key, kind in (("models", str), ("variants", str), ("tasks", str), ("seeds", int), ("image_sizes", int),
                          ("table_metrics", str)):
            if key in values:
                values[key] = _as_list(key, values[key], kind)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    return validate(SweepConfig(**values, source=source), where, here=here)


def _check_types(config: SweepConfig, where: str) -> None:
    for key, (kinds, accepted) in _SCALARS.items():
        value = getattr(config, key)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"{where}config key {key!r} = {value!r} is a {type(value).__name__}; "
                              f"accepted: {accepted}")


def check_device(device: str) -> str:
    """``device`` if this machine has it: ``cpu``, or ``cuda``/``cuda:N`` where torch sees that GPU."""
    if device == "cpu":
        return device
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); accepted here: cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: torch sees {torch.cuda.device_count()} GPU(s); "
                          f"accepted: cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def validate(config: SweepConfig, where: str = "", *, here: bool = True) -> SweepConfig:
    """Check every name, type and value now, so no cell fails for a typo.

    Tasks are built here (not prepared): that checks their suffix and every option against what
    the task declares. What needs a loaded model (layer ranges against its depth, image sizes it
    can take) is checked by the runner's preflight, still before any cell runs.
    """
    _check_types(config, where)
    if not config.models:
        raise ConfigError(f"{where}no models; set models = [...], e.g. 'tiny:vit' or 'timm:vit_base_patch16_224'")
    if not config.tasks:
        raise ConfigError(f"{where}no tasks; set tasks = [...], e.g. 'fidelity:images'")
    if not config.variants:
        raise ConfigError(f"{where}no variants; set variants = [...], e.g. 'exact' and 'fna:m=64'")
    for name in config.models:
        try:
            MODELS.resolve(name)
        except RegistryError as err:
            raise ConfigError(f"{where}{err}") from None
    for task, options in config.task_options.items():
        if task not in config.tasks or not isinstance(options, dict):
            raise ConfigError(f"{where}task_options.{task!r} must name a task of this sweep "
                              f"({', '.join(config.tasks)}) and be a table")
    for name in config.tasks:
        try:
            make_task(name, config.task_options.get(name))
        except (RegistryError, TaskError, MissingExtraError) as err:
            raise ConfigError(f"{where}{err}") from None
    for spec in config.variants:
        try:
            parse_variant(expand_variant(spec))
        except SpecError as err:
            raise ConfigError(f"{where}{err}") from None
    if config.dtype not in DTYPES:
        raise ConfigError(f"{where}unknown dtype {config.dtype!r}; accepted: {', '.join(DTYPES)}")

    try:
        executor = parse_executor(config.executor)
        # a SLURM sweep is submitted from a login node without the GPUs its jobs get; each job checks its own
        remote_gpu = executor.kind == "slurm" and (config.device == "cuda" or (
            config.device.startswith("cuda:") and config.device[5:].isdigit()))
        if here and not remote_gpu:  # here=False: only read (fnabench status), not run on this machine
            check_device(config.device)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    for key in ("batch_size", "timing_repeats"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{where}{key} must be an integer >= 1, got {getattr(config, key)!r}")
    if config.timing_warmup < 0:
        raise ConfigError(f"{where}timing_warmup must be an integer >= 0, got {config.timing_warmup!r}")
    if config.limit is not None and config.limit < 1:
        raise ConfigError(f"{where}limit must be an integer >= 1, got {config.limit!r}")
    if not config.seeds:
        raise ConfigError(f"{where}no seeds; set seeds = [0] or leave the key out")
    for size in config.image_sizes:
        if size is not None and size < 8:
            raise ConfigError(f"{where}image size {size} is too small; accepted: integers >= 8 (pixels)")
    if not config.image_sizes:
        raise ConfigError(f"{where}image_sizes is empty; leave the key out for each model's own size")
    return config


def load(path: str | Path | None = None, *, here: bool = True) -> SweepConfig:
    """Read a TOML sweep config; ``None`` reads the packaged offline default sweep."""
    if path is None:
        text = resources.files("fnabench.harness").joinpath(DEFAULT_CONFIG).read_text()
        source = f"fnabench/harness/{DEFAULT_CONFIG}"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        text, source = p.read_text(), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: invalid TOML ({err})") from None
    return from_dict(data, source, here=here)


def override(config: SweepConfig, **changes: Any) -> SweepConfig:
    """Apply CLI overrides (``None`` means not given) and re-validate.

    ``tasks`` replaces the task list; options of tasks no longer in it are dropped with them.
    """
    given = {k: v for k, v in changes.items() if v is not None}
    if "tasks" in given:
        given["task_options"] = {t: o for t, o in config.task_options.items() if t in given["tasks"]}
    return validate(replace(config, **given))
