"""Sweep configs: a TOML file (or the packaged default) plus CLI overrides, validated up front.

Every problem is one :class:`ConfigError` line naming the key and what is accepted, raised before
any model loads, so a typo never costs a half-run sweep.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..variants import SpecError, parse_variant
from .registry import MODELS, TASKS, RegistryError, expand_variant

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_CONFIG = "default_sweep.toml"


class ConfigError(ValueError):
    """A sweep config that cannot run; one line naming what is wrong and what is accepted."""


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
    source: str | None = None  # where the config came from (for records and publish)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def canonical_variants(self) -> list[str]:
        """Variant specs in canonical form, exact first (speed ratios need it), duplicates removed."""
        out: list[str] = []
        for spec in self.variants:
            canon = parse_variant(expand_variant(spec)).canonical
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


def from_dict(data: dict[str, Any], source: str | None = None) -> SweepConfig:
    """Build and validate a config from parsed TOML (or any dict with the same keys)."""
    where = f"{source}: " if source else ""
    values: dict[str, Any] = {}
    for key, value in data.items():
        target = _ALIASES.get(key, key)
        if target not in _KEYS:
            raise ConfigError(f"{where}unknown config key {key!r}; accepted: {', '.join(sorted(_KEYS))}")
        values[target] = value
    try:
        for key, kind in (("models", str), ("variants", str), ("tasks", str), ("seeds", int)):
            if key in values:
                values[key] = _as_list(key, values[key], kind)
        if "image_sizes" in values:
            values["image_sizes"] = _as_list("image_sizes", values["image_sizes"], int)
        config = SweepConfig(**values, source=source)
    except TypeError as err:
        raise ConfigError(f"{where}{err}") from None
    return validate(config, where)


def validate(config: SweepConfig, where: str = "") -> SweepConfig:
    """Check every name and value now, so no cell fails for a typo."""
    if not config.models:
        raise ConfigError(f"{where}no models; set models = [...], e.g. 'tiny:vit' or 'timm:vit_base_patch16_224'")
    if not config.tasks:
        raise ConfigError(f"{where}no tasks; set tasks = [...], e.g. 'fidelity:images'")
    for name in config.models:
        try:
            MODELS.resolve(name)
        except RegistryError as err:
            raise ConfigError(f"{where}{err}") from None
    for name in config.tasks:
        try:
            TASKS.resolve(name)
        except RegistryError as err:
            raise ConfigError(f"{where}{err}") from None
    for spec in config.variants:
        try:
            parse_variant(expand_variant(spec))
        except SpecError as err:
            raise ConfigError(f"{where}{err}") from None
    if not isinstance(config.description, str):
        raise ConfigError(f"{where}description must be a string (Markdown), got {type(config.description).__name__}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"{where}unknown dtype {config.dtype!r}; accepted: {', '.join(DTYPES)}")
    if not (config.device == "cpu" or config.device.startswith("cuda")):
        raise ConfigError(f"{where}unknown device {config.device!r}; accepted: cpu, cuda, cuda:N")
    for key in ("batch_size", "timing_repeats"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            raise ConfigError(f"{where}{key} must be an integer >= 1, got {getattr(config, key)!r}")
    if config.limit is not None and (not isinstance(config.limit, int) or config.limit < 1):
        raise ConfigError(f"{where}limit must be an integer >= 1, got {config.limit!r}")
    for size in config.image_sizes:
        if size is not None and size < 8:
            raise ConfigError(f"{where}image size {size} is too small; accepted: integers >= 8 (pixels)")
    for task, options in config.task_options.items():
        if task not in config.tasks or not isinstance(options, dict):
            raise ConfigError(f"{where}task_options.{task!r} must name a task of this sweep and be a table")
    return config


def load(path: str | Path | None = None) -> SweepConfig:
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
    return from_dict(data, source)


def override(config: SweepConfig, **changes: Any) -> SweepConfig:
    """Apply CLI overrides (``None`` means not given) and re-validate."""
    given = {k: v for k, v in changes.items() if v is not None}
    return validate(replace(config, **given))
