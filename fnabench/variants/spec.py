"""Variant spec grammar: ``name:key=value,...`` joined with ``+``, with one canonical string each.

The canonical string (defaults filled, keys sorted, core component first) is a variant's identity
in records, so two spellings of the same variant always land in the same leaderboard row. What each
component accepts comes from its declaration (variants/components.py, the registry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from fnabench._errors import UserError
from fnabench.variants.component import ComponentDecl
from fnabench.variants.components import CORES, DECLARATIONS, EXACT, FLOW_COMPONENTS, MODIFIERS
from fnabench.variants.params import LayerSlice, Param, TokenSet, format_value


class SpecError(UserError, ValueError):
    """A variant spec that cannot be parsed; the message is one line naming what is accepted."""


#: every component's keys, name → {key: Param}, in registry order (a view of the declarations)
COMPONENTS: dict[str, dict[str, Param]] = {name: dict(decl.params) for name, decl in DECLARATIONS.items()}


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

    @property
    def decl(self) -> ComponentDecl:
        """This component's declaration: its role, keys and behaviour."""
        return DECLARATIONS[self.name]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def _shown(self) -> list[tuple[str, Any]]:
        keys = self.decl.params
        return [(k, v) for k, v in self.params if not (keys[k].omit_at_default and v == keys[k].default)]

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
        decl = self.decl
        diff = [f"{k}={format_value(v)}" for k, v in self._shown()
                if v != decl.params[k].default or k in decl.always_shown]
        return self.name + (":" + ",".join(diff) if diff else "")


def parse_component(text: str, spec: str) -> Component:
    """Parse one ``name:key=value,...`` part of ``spec`` into a :class:`Component`."""
    name, _, body = text.strip().partition(":")
    name = name.strip()
    if name not in DECLARATIONS:
        raise SpecError(
            f"unknown variant {name!r} in {spec!r}; accepted: {', '.join(sorted(DECLARATIONS))}"
        )
    keys = DECLARATIONS[name].params
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
    flows = [p for p in parts if p.name in FLOW_COMPONENTS]
    if flows and (len(flows) > 1 or mods or any(not c.decl.exact for c in cores)):
        others = [p.name for p in parts if p is not flows[0]]
        raise SpecError(f"{spec!r}: token flow ({flows[0].name}) runs with exact attention only, not with "
                        f"{', '.join(others)}; accepted: one of {', '.join(FLOW_COMPONENTS)}, alone or with {EXACT}")
    if len(cores) > 1:
        raise SpecError(
            f"{spec!r} names {len(cores)} attention cores ({', '.join(c.name for c in cores)}); "
            f"accepted: at most one of {', '.join(CORES)}, plus an optional mask"
        )
    if len(mods) > 1:
        raise SpecError(f"{spec!r} names mask twice; accepted: at most one mask component")
    core = cores[0] if cores else parse_component(EXACT, spec)
    mask = mods[0] if mods else None
    if mask is not None and mask["action"] == "keys" and core.decl.key_mask_refusal:
        raise SpecError(f"{spec!r}: {core.decl.key_mask_refusal}")
    for part in parts:  # each component's own consistency (mask: massive_ratio above artifact_ratio)
        problem = part.decl.check(part) if part.decl.check is not None else None
        if problem:
            raise SpecError(f"{spec!r}: {problem}")
    return core, mask, (flows[0] if flows else None)


__all__ = [
    "COMPONENTS",
    "CORES",
    "FLOW_COMPONENTS",
    "MODIFIERS",
    "Component",
    "LayerSlice",
    "Param",
    "SpecError",
    "TokenSet",
    "format_value",
    "parse_component",
    "parse_components",
    "parse_flow",
]
