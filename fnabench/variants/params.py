"""The keys of variant components: value types, parsers, :class:`Param` and the keys several components share.

The bottom of the variants package: it imports no other variants module, so every component module
(``exact.py``, ``fna.py``, ...) can declare its keys from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def parse_int(text: str) -> int:
    return int(text)


def parse_slice(text: str) -> LayerSlice:
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


def parse_tokens(text: str) -> TokenSet:
    if text in ("none", "prefix", "cls", "text"):
        return TokenSet(text)
    return TokenSet("span", parse_slice(text))


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def parse_int_or_auto(text: str) -> int | None:
    return None if text == "auto" else int(text)


def parse_float_or_auto(text: str) -> float | None:
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
    #: left out of the canonical string at its default, so old record ids stay unchanged: a key added after
    #: variant strings were first recorded, whose default is what the variant did before the key existed
    omit_at_default: bool = False


def choice(*options: str) -> Param:
    """A key taking one of ``options``; the first is its default."""
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(text)
        return text

    return Param(parse, options[0], " | ".join(options))


# ---------------------------------------------------------------------------------------------
# keys several components share

LAYERS = Param(parse_slice, LayerSlice(None, None), "a slice such as ':' or '-6:' or an index")
TOWER = choice("image", "text", "all")
#: landmarks (FNA) or segments (Nyströmformer)
M = Param(parse_int, 64, "an integer >= 1", lambda v: v >= 1)
ITERS = Param(parse_int, 6, "an integer >= 1", lambda v: v >= 1)
RCOND = Param(parse_float_or_auto, None, "'auto' (torch's default) or a float in (0, 1)",
              lambda v: v is None or 0 < v < 1)
#: causal attention only (decoders): Tikhonov weight of the lower-triangular inverse (variants/causal.py)
RIDGE = Param(float, 1.0, "a float > 0", lambda v: v > 0, omit_at_default=True)
#: causal attention only: what generation keeps for the prefill (landmark keys and Ṽ, or every token)
CACHE = Param(choice("landmark", "full").parse, "landmark", "landmark | full", omit_at_default=True)
#: auto: per layer and input size, run exact attention where the approximation would cost more counted FLOPs
FALLBACK = Param(choice("none", "auto").parse, "none", "none | auto", omit_at_default=True)
RATIO = "a float > 1"
