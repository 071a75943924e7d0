"""One model family of a host library, its tiny instance and fnabench's promise for it (see the package doc)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

#: what a family is, as the contract tests it
ROLES = ("decoder", "encoder", "causal encoder")
#: how fnabench reaches its attention: the host's attention interface (a registered function), the module's
#: forward replaced by one that projects q, k, v itself, or not at all
ROUTES = ("interface", "forward", "refused")


@dataclass(frozen=True)
class Family:
    """One model family of a host library, its tiny instance and fnabench's promise for it."""

    #: the family as its host names it ("llama", "vit_small_patch16_224", "open_clip text")
    name: str
    #: the host library's import name
    host: str
    #: decoder (a causal LM: ``make`` returns the LM and token ids), encoder (bidirectional), or causal encoder
    #: (a causal text tower that is not a generator, e.g. CLIP's)
    role: str
    #: () → (tiny model in eval mode, an input, output function (model, input) → tensor)
    make: Callable[[], tuple[nn.Module, object, Callable]]
    #: how its attention is patched (``ROUTES``)
    route: str
    #: for a refused family: the part of the one-line refusal that names what it lacks
    refused: str | None = None
    #: one line for the support table (what is special about it, what runs exact)
    note: str = ""
    #: False where the variant rightly runs exact everywhere on the tiny input (every layer's sliding window
    #: binds): the contract then checks that the output is exact's and that every layer says why
    live: bool = True
    #: a decoder's KV caches the contract generates with (``cache=`` values); one left out must be refused
    caches: tuple[str, ...] = ("full", "landmark")

    def __post_init__(self) -> None:
        if self.role not in ROLES or self.route not in ROUTES:
            raise ValueError(f"{self.host} {self.name}: role {self.role!r} / route {self.route!r}; accepted: "
                             f"{ROLES} / {ROUTES}")
        if (self.route == "refused") != (self.refused is not None):
            raise ValueError(f"{self.host} {self.name}: a refused family names its refusal, and only it")

    @property
    def label(self) -> str:
        return f"{self.host} {self.name}"
