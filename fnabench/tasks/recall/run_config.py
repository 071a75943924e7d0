"""Run configuration for the recall suite: data, model, training and evaluation settings, and their TOML/JSON forms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fnabench._errors import ConfigError
from fnabench._io import toml_value as _toml_value

FAMILIES = ("ortho_haar", "ortho", "ident", "gauss")
PROBES = ("none", "misdirected", "sync", "unseen_label", "unseen_system")
EMERGENCE_RULES = ("first", "sustained")


def _later(default: Any) -> Any:
    """A key added after configs were first stored: left out of :func:`section_dict` at its default, so the
    identity of every older config (cached runs' hashes, evaluation tags, records) stays what it was."""
    return field(default=default, metadata={"omit_at_default": True})


def section_dict(section: Any) -> dict[str, Any]:
    """One config section as a plain dict (tuples as lists), later-added keys omitted at their default."""
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("omit_at_default") and value == f.default:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class DataConfig:
    """The systems, token vocabulary and training-trace interleaving (paper defaults)."""

    state_dim: int = 5
    num_labels: int = 25
    context: int = 251
    family: str = "ortho_haar"
    noise_std: float = 0.0
    hidden_dim: int = 0  # gauss family only: hidden state size (0 → 2 × state_dim)
    train_systems: int = 40_000
    val_systems: int = 100
    trace_len: int = 0  # states per stored trajectory (0 → context)
    zipf_a: float = 1.5
    max_systems: int = 0  # most systems in one training trace (0 → num_labels)
    cuts_per_system: float = 2.0
    corpus_seed: int = 0

    @property
    def states_per_trace(self) -> int:
        return self.trace_len or self.context

    @property
    def systems_cap(self) -> int:
        return self.max_systems or self.num_labels

    @property
    def max_cuts(self) -> int:
        return (self.context - 1) // 2


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-2 backbone size; ``attention`` is transformers' implementation name."""

    n_embd: int = 128
    n_layer: int = 12
    n_head: int = 8
    attention: str = "sdpa"


@dataclass(frozen=True)
class TrainConfig:
    """AdamW at a constant learning rate, clipped gradients, checkpoints every ``checkpoint_every`` steps."""

    batch: int = 512
    lr: float = 1.5849e-5
    steps: int = 200_000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    warmup: int = _later(0)  # steps of linear learning-rate warm-up from 0 (then constant)

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) step ``step``: linear warm-up over ``warmup`` steps, then ``lr``."""
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr


@dataclass(frozen=True)
class EvalConfig:
    """The recall query (H haystack systems, ``segment_obs`` observations each) and how many are drawn."""

    haystack: int = 19
    segment_obs: int = 10
    query_obs: int = 0  # observations after the query's open label (0 → segment_obs)
    needle: int = 0
    examples: int = 50
    traces: int = 1000
    ks: tuple[int, ...] = (1, 2, 3, 7, 8)
    emergence_fraction: float = 0.5
    batch: int = 1000
    seed: int = 1234
    #: which crossing the emergence point names: the first checkpoint below the threshold, or the one from which
    #: the curve stays below it to the end of the run (both are always stored)
    emergence_rule: str = _later("first")

    @property
    def query_len(self) -> int:
        return self.query_obs or self.segment_obs

    @property
    def seq_len(self) -> int:
        return 1 + self.haystack * (self.segment_obs + 2) + 1 + self.query_len

    @property
    def name(self) -> str:
        """The harness task name, e.g. ``recall:h5`` (needle position appended when not first)."""
        return f"recall:h{self.haystack}" + (f",needle={self.needle}" if self.needle else "")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; its JSON form is stored in the run directory."""

    preset: str = "medium"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def n_positions(self) -> int:
        """Positions the model needs: the longer of a training input and a recall query input."""
        return max(self.data.context, self.eval.seq_len) - 1

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` on values that cannot work together; return self."""
        d, m, t, e = self.data, self.model, self.train, self.eval
        checks = [
            (d.family in FAMILIES, f"data.family must be one of {', '.join(FAMILIES)}, got {d.family!r}"),
            (d.state_dim >= 1 and d.num_labels >= 1, "data.state_dim and data.num_labels must be >= 1"),
            (d.context >= 4, f"data.context must be >= 4, got {d.context}"),
            (1 <= d.systems_cap <= d.num_labels, "data.max_systems must be between 1 and data.num_labels"),
            (d.train_systems >= d.systems_cap, "data.train_systems must be >= the most systems in one trace"),
            (d.val_systems >= e.haystack + 1, "data.val_systems must exceed eval.haystack (probes need one more)"),
            (d.states_per_trace >= d.context - 1, "data.trace_len must be >= data.context - 1"),
            (m.n_embd % m.n_head == 0, f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})"),
            (t.batch >= 1 and t.steps >= 0 and t.lr > 0, "train.batch >= 1, train.steps >= 0, train.lr > 0"),
            (t.checkpoint_every >= 1 and t.log_every >= 1, "train.checkpoint_every and train.log_every must be >= 1"),
            (e.haystack >= 1 and e.segment_obs >= 1, "eval.haystack and eval.segment_obs must be >= 1"),
            (e.haystack + 1 <= d.num_labels, "eval.haystack + 1 labels are needed (unseen-label probe)"),
            (0 <= e.needle < e.haystack, f"eval.needle must be in [0, {e.haystack}), got {e.needle}"),
            (all(1 <= k <= e.query_len for k in e.ks), f"eval.ks must lie in [1, {e.query_len}], got {e.ks}"),
            (e.examples >= 1 and e.traces >= 1 and e.batch >= 1, "eval.examples, eval.traces, eval.batch >= 1"),
            (0 < e.emergence_fraction < 1, "eval.emergence_fraction must be in (0, 1)"),
            (e.emergence_rule in EMERGENCE_RULES,
             f"eval.emergence_rule must be one of {', '.join(EMERGENCE_RULES)}, got {e.emergence_rule!r}"),
            (t.warmup >= 0, f"train.warmup must be >= 0, got {t.warmup}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    # ------------------------------------------------------------------------------ conversions

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the JSON/TOML form; later-added keys at their default left out."""
        return {"preset": self.preset, **{name: section_dict(getattr(self, name)) for name in _SECTIONS}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a nested dict; unknown sections or keys are errors naming the valid ones."""
        return apply_overrides(cls(), raw)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _coerce(value: Any, current: Any) -> Any:
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(int(v) for v in items)
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return bool(value)
    if isinstance(current, int):
        number = float(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if isinstance(current, float):
        result = float(value)
        if not math.isfinite(result):
            raise ValueError(value)
        return result
    return str(value)


def apply_overrides(config: RunConfig, raw: dict[str, Any]) -> RunConfig:
    """Return ``config`` with the nested ``{section: {key: value}}`` (or ``preset``) values replaced."""
    updates: dict[str, Any] = {}
    for section, values in raw.items():
        if section == "preset":
            updates["preset"] = str(values)
            continue
        if section not in _SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"unknown config section {section!r}; valid: preset, {', '.join(_SECTIONS)}")
        current = getattr(config, section)
        valid = {f.name for f in fields(current)}
        changes = {}
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(f"unknown key {section}.{key}; valid: {', '.join(sorted(valid))}")
            try:
                changes[key] = _coerce(value, getattr(current, key))
            except (TypeError, ValueError):
                raise ConfigError(f"bad value for {section}.{key}: {value!r}") from None
        updates[section] = replace(current, **changes)
    return replace(config, **updates)


def parse_assignments(items: list[str]) -> dict[str, dict[str, str]]:
    """``["train.steps=100", "data.state_dim=3"]`` → ``{"train": {"steps": "100"}, "data": {...}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set takes SECTION.KEY=VALUE (e.g. train.steps=100), got {item!r}")
        out.setdefault(section, {})[name] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------- TOML


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file (tomllib on 3.11+, tomli before), raising ConfigError on a missing or bad file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def to_toml(config: RunConfig, header: str = "") -> str:
    """The config as TOML text (one table per section), readable back with :func:`read_toml`."""
    raw = config.to_dict()
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append(f"preset = {_toml_value(raw.pop('preset'))}")
    for section, values in raw.items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
