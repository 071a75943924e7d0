"""Variant spec grammar: ``name:key=value,...`` joined with ``+``, with one canonical string each.

The canonical string (defaults filled, keys sorted, core component first) is a variant's identity
in records, so two spellings of the same variant always land in the same leaderboard row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from fnabench._errors import UserError


class SpecError(UserError, ValueError):
    """A variant spec that cannot be parsed; the message is one line naming what is accepted."""


# ---------------------------------------------------------------------------------------------
# value types


@dataclass(frozen=True)
class LayerSlice:
    """A Python slice over a tower's blocks (``-11:`` = the last 11), or a single index."""

    start: int | None
    stop: int | None
    step: int | None = None
    single: bool = False

    def resolve(self, num_layers: int) -> range:
        """The block indices this slice selects in a tower of ``num_layers`` blocks."""
        if self.single:
            i = self.start if self.start >= 0 else num_layers + self.start  # type: ignore[operator]
            return range(i, i + 1) if 0 <= i < num_layers else range(0)
        return range(num_layers)[slice(self.start, self.stop, self.step)]

    def __str__(self) -> str:
        if self.single:
            return str(self.start)
        parts = ["" if p is None else str(p) for p in (self.start, self.stop)]
        if self.step not in (None, 1):
            parts.append(str(self.step))
        return ":".join(parts)


def _parse_int(text: str) -> int:
    return int(text)


def _parse_slice(text: str) -> LayerSlice:
    if ":" not in text:
        return LayerSlice(int(text), None, None, single=True)
    parts = text.split(":")
    if len(parts) > 3:
        raise ValueError(text)
    nums = [int(p) if p.strip() else None for p in parts] + [None] * (3 - len(parts))
    if nums[2] == 0:
        raise ValueError(text)
    return LayerSlice(nums[0], nums[1], None if nums[2] == 1 else nums[2])


@dataclass(frozen=True)
class TokenSet:
    """A set of token positions: ``none``, ``prefix`` (CLS and registers), ``cls``, ``text`` (the text tokens
    of a multimodal language model's sequence, i.e. every token that is not an image token) or a slice ``a:b``."""

    kind: str
    span: LayerSlice | None = None

    def mask(self, num_tokens: int, num_prefix: int, image_tokens=None):
        """Boolean [N] tensor of the positions in the set; ``text`` needs ``image_tokens`` (bool [N])."""
        import torch

        out = torch.zeros(num_tokens, dtype=torch.bool)
        if self.kind == "text":
            if image_tokens is None or image_tokens.shape[-1] != num_tokens:
                raise ValueError("guarantee/exclude=text needs to know which tokens are image tokens: patch the "
                                 "whole LLaVA-family model (its input_ids mark them), not its language model alone")
            rows = image_tokens.reshape(-1, num_tokens).cpu()
            if not bool((rows == rows[:1]).all()):
                raise ValueError("guarantee/exclude=text needs every row of the batch to hold its image tokens at the "
                                 "same positions; accepted: batch size 1 or prompts of one layout")
            return ~rows[0]
        if self.kind == "prefix":
            out[:num_prefix] = True
        elif self.kind == "cls":
            out[:1] = num_prefix > 0
        elif self.kind == "span":
            out[list(self.span.resolve(num_tokens))] = True  # type: ignore[union-attr]
        return out

    def __str__(self) -> str:
        return str(self.span) if self.kind == "span" else self.kind


def _parse_tokens(text: str) -> TokenSet:
    if text in ("none", "prefix", "cls", "text"):
        return TokenSet(text)
    return TokenSet("span", _parse_slice(text))


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def _parse_int_or_auto(text: str) -> int | None:
    return None if text == "auto" else int(text)


def _parse_float_or_auto(text: str) -> float | None:
    return None if text == "auto" else float(text)


def format_value(value: Any) -> str:
    """A parsed value as it appears in canonical strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "auto"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


@dataclass(frozen=True)
class Param:
    """One key of a component: how to parse it, its default, what it accepts (for error messages)."""

    parse: Callable[[str], Any]
    default: Any
    accepts: str
    check: Callable[[Any], bool] = lambda _v: True
    #: a key added after variant strings were first recorded: left out of the canonical string at
    #: its default, so the identities of records written before it existed do not change
    later: bool = False


def _choice(*options: str) -> Param:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(text)
        return text

    return Param(parse, options[0], " | ".join(options))


_LAYERS = Param(_parse_slice, LayerSlice(None, None), "a slice such as ':' or '-6:' or an index")
_TOWER = _choice("image", "text", "all")
_M = Param(_parse_int, 64, "an integer >= 1", lambda v: v >= 1)
_PINV = _choice("newton", "exact", "ridge")  # Nyströmformer keeps its paper's iterative inverse
#: FNA's default is the ridge solve: fewer counted FLOPs than Newton–Schulz and, measured on the offline
#: DINOv2-S fidelity task (configs/sweeps/fna_inverses.toml), closer to exact attention
_FNA_PINV = _choice("ridge", "newton", "exact")
#: causal attention only (decoders): Tikhonov weight of the lower-triangular inverse (variants/causal.py)
_RIDGE = Param(float, 1.0, "a float > 0", lambda v: v > 0, later=True)
#: causal attention only: what generation keeps for the prefill (landmark keys and Ṽ, or every token)
_CACHE = Param(_choice("landmark", "full").parse, "landmark", "landmark | full", later=True)
#: auto: per layer and input size, run exact attention where the approximation would cost more counted FLOPs
_FALLBACK = Param(_choice("none", "auto").parse, "none", "none | auto", later=True)
_ITERS = Param(_parse_int, 6, "an integer >= 1", lambda v: v >= 1)
_RCOND = Param(_parse_float_or_auto, None, "'auto' (torch's default) or a float in (0, 1)",
               lambda v: v is None or 0 < v < 1)
_RATIO = "a float > 1"

#: Components and their keys.  The order of the first key of each choice is its default.
COMPONENTS: dict[str, dict[str, Param]] = {
    "exact": {
        "impl": _choice("sdpa", "math"),
        # where exact attention is patched in (a LLaVA model's language model is tower=text); not in the
        # canonical string at its default, so exact's identity is what it always was
        "tower": Param(_TOWER.parse, "image", _TOWER.accepts, later=True),
    },
    "fna": {
        "m": _M,
        "layers": _LAYERS,
        "tower": _TOWER,
        "landmarks": _choice("fps", "random", "norm", "stride"),
        "features": _choice("q", "k", "v", "input"),
        "pinv": _FNA_PINV,
        "iters": _ITERS,
        "rcond": _RCOND,
        "resample": Param(_parse_bool, False, "true | false"),
        "guarantee": Param(_parse_tokens, TokenSet("prefix"), "none | prefix | cls | text | a slice a:b"),
        "exclude": Param(_parse_tokens, TokenSet("none"), "none | prefix | cls | text | a slice a:b"),
        "seed": Param(_parse_int, 0, "an integer"),
        "norm_ratio": Param(float, 3.0, _RATIO, lambda v: v > 1),
        "ridge": _RIDGE,
        "cache": _CACHE,
        "fallback": _FALLBACK,
    },
    "nystrom": {
        "m": _M,
        "layers": _LAYERS,
        "tower": _TOWER,
        "pinv": _PINV,
        "iters": _ITERS,
        "rcond": _RCOND,
        "ridge": _RIDGE,
        "cache": _CACHE,
        "fallback": _FALLBACK,
    },
    "mask": {
        "tokens": _choice("artifact", "massive", "all", "first"),
        "action": _choice("keys", "values"),
        "layers": _LAYERS,
        "tower": _TOWER,
        "artifact_ratio": Param(float, 3.0, _RATIO, lambda v: v > 1),
        "massive_ratio": Param(float, 20.0, _RATIO, lambda v: v > 1),
        "detect": _choice("each", "first"),
    },
    # Not an approximation: attention that costs nothing (out = V), to measure Amdahl bounds.
    "null": {
        "layers": _LAYERS,
        "tower": _TOWER,
    },
    # Token flow (variants/flow.py): ToMe merges r tokens after the attention of each block in `layers`
    # (bipartite soft matching on the keys), tracks token sizes, and lets attention weigh a merged token by
    # its size (prop_attn); at the tower's end merged tokens are copied back to every position they absorbed.
    "tome": {
        "r": Param(_parse_int, 8, "an integer >= 0", lambda v: v >= 0),
        "layers": _LAYERS,
        "tower": _choice("image"),
        "prop_attn": Param(_parse_bool, True, "true | false"),
    },
    # VisionZip-style (variants/visionzip.py): at block `layers` of a vision tower keep `tokens` patch tokens,
    # the dominant ones by CLS attention plus `contextual` merged ones (auto: about a sixth of `tokens`)
    "visionzip": {
        "tokens": Param(_parse_int, 64, "an integer >= 1", lambda v: v >= 1),
        "contextual": Param(_parse_int_or_auto, None, "'auto' or an integer >= 0", lambda v: v is None or v >= 0),
        "layers": Param(_parse_slice, LayerSlice(-2, None, single=True), "one block index such as -2",
                        lambda v: v.single),
        "tower": _choice("image"),
    },
    # FastV-style (variants/fastv.py): in a multimodal model's language model, after the attention of block
    # `layers`, keep the `tokens` image tokens that receive most attention, and every text token
    "fastv": {
        "tokens": Param(_parse_int, 64, "an integer >= 0", lambda v: v >= 0),
        "layers": Param(_parse_slice, LayerSlice(2, None, single=True), "one block index such as 2",
                        lambda v: v.single),
        "tower": _choice("text"),
    },
}

#: keys the short form shows even at their default, because they define the row
_ALWAYS_SHOWN = {"m", "r", "visionzip.tokens", "fastv.tokens"}

CORES = ("exact", "fna", "nystrom", "null")
MODIFIERS = ("mask",)
#: token-flow components: they change how many tokens flow through later blocks (patched at block level)
FLOWS = ("tome", "visionzip", "fastv")


@dataclass(frozen=True)
class Component:
    """One parsed ``name:key=value,...`` part with every key filled.

    ``given`` names the keys the spec spelt out; a default may depend on the model (on causal
    attention an unnamed ``landmarks``/``pinv`` becomes a causal-safe one), a named value never does.
    """

    name: str
    params: tuple[tuple[str, Any], ...]
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @cached_property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def _shown(self) -> list[tuple[str, Any]]:
        keys = COMPONENTS[self.name]
        return [(k, v) for k, v in self.params if not (keys[k].later and v == keys[k].default)]

    @property
    def canonical(self) -> str:
        shown = self._shown()
        if not shown:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in shown)

    def with_values(self, **values: Any) -> Component:
        """A copy with ``values`` set, as if the spec had named them."""
        merged = {**self.values, **values}
        return Component(self.name, tuple(sorted(merged.items())), self.given | set(values))

    @property
    def short(self) -> str:
        """Only the keys that differ from their defaults: the compact form for tables."""
        keys = COMPONENTS[self.name]
        diff = [f"{k}={format_value(v)}" for k, v in self._shown()
                if v != keys[k].default or k in _ALWAYS_SHOWN or f"{self.name}.{k}" in _ALWAYS_SHOWN]
        return self.name + (":" + ",".join(diff) if diff else "")


def parse_component(text: str, spec: str) -> Component:
    """Parse one ``name:key=value,...`` part of ``spec`` into a :class:`Component`."""
    name, _, body = text.strip().partition(":")
    name = name.strip()
    if name not in COMPONENTS:
        raise SpecError(
            f"unknown variant {name!r} in {spec!r}; accepted: {', '.join(sorted(COMPONENTS))}"
        )
    keys = COMPONENTS[name]
    values = {k: p.default for k, p in keys.items()}
    seen: set[str] = set()
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if key not in keys:
            accepted = ", ".join(sorted(keys)) or "no keys"
            raise SpecError(f"unknown key {key!r} for {name!r} in {spec!r}; accepted: {accepted}")
        if not eq or not raw:
            raise SpecError(f"key {key!r} of {name!r} in {spec!r} needs a value: {keys[key].accepts}")
        if key in seen:
            raise SpecError(f"key {key!r} given twice for {name!r} in {spec!r}")
        seen.add(key)
        try:
            value = keys[key].parse(raw)
            ok = keys[key].check(value)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise SpecError(
                f"bad value {raw!r} for {name}:{key} in {spec!r}; accepted: {keys[key].accepts}"
            )
        values[key] = value
    return Component(name, tuple(sorted(values.items())), frozenset(seen))


def parse_components(spec: str) -> tuple[Component, Component | None]:
    """Split a full spec into its attention core and optional mask; check how they combine.

    A token-flow component is not returned here (see :func:`parse_flow`)."""
    return _parse_all(spec)[:2]


def parse_flow(spec: str) -> tuple[Component, Component | None, Component | None]:
    """Core, optional mask and optional token-flow component of a spec."""
    return _parse_all(spec)


def _parse_all(spec: str) -> tuple[Component, Component | None, Component | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty variant spec {spec!r}; example: 'fna:m=64,layers=-6:+mask'")
    parts = [parse_component(p, spec) for p in spec.split("+")]
    cores = [p for p in parts if p.name in CORES]
    mods = [p for p in parts if p.name in MODIFIERS]
    flows = [p for p in parts if p.name in FLOWS]
    if flows and (len(flows) > 1 or mods or any(c.name != "exact" for c in cores)):
        others = [p.name for p in parts if p is not flows[0]]
        raise SpecError(f"{spec!r}: token flow ({flows[0].name}) runs with exact attention only, not with "
                        f"{', '.join(others)}; accepted: one of {', '.join(FLOWS)}, alone or with exact")
    if len(cores) > 1:
        raise SpecError(
            f"{spec!r} names {len(cores)} attention cores ({', '.join(c.name for c in cores)}); "
            f"accepted: at most one of {', '.join(CORES)}, plus an optional mask"
        )
    if len(mods) > 1:
        raise SpecError(f"{spec!r} names mask twice; accepted: at most one mask component")
    core = cores[0] if cores else parse_component("exact", spec)
    mask = mods[0] if mods else None
    if mask is not None and mask["action"] == "keys" and core.name == "nystrom":
        raise SpecError(
            f"{spec!r}: nystrom landmarks are segment means, so key masking is undefined; "
            "accepted: mask:action=values with nystrom, or action=keys with exact/fna"
        )
    if mask is not None and mask["massive_ratio"] <= mask["artifact_ratio"]:
        raise SpecError(
            f"{spec!r}: mask massive_ratio must exceed artifact_ratio "
            f"(got {mask['massive_ratio']:g} <= {mask['artifact_ratio']:g})"
        )
    return core, mask, (flows[0] if flows else None)
