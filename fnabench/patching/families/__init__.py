"""The tiny-model registry behind the family contract: one :class:`Family` per model family a host library
ships, with how to build a tiny random-initialised instance and what fnabench promises for it.

Each host's families are data in ``families/<host>.py`` (``FAMILIES``, one entry per line); adding a family is
one line there. ``tests/test_family_contract.py`` builds every family and holds it to its declaration: a
family that passes runs exact, FNA and undo as promised (a decoder also never leaks the future and generates
exact's tokens with either cache); a refused family is refused in one line containing its ``refused`` text.
``fnabench list hosts`` and ``docs/support.md`` print the table these declarations make.
"""

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


def all_families() -> list[Family]:
    """Every declared family of every host, in host order (declarations only: nothing is built)."""
    from fnabench.patching.families import open_clip, timm, transformers

    return [*transformers.FAMILIES, *timm.FAMILIES, *open_clip.FAMILIES]


def support_table(families: list[Family] | None = None) -> str:
    """The support table (markdown): family → role, route, what the contract checks or why it is refused."""
    families = all_families() if families is None else families
    checks = {"decoder": "no leak, m ≥ N exact, undo, generate (full and landmark cache)",
              "encoder": "m ≥ N exact, live, undo",
              "causal encoder": "no leak, m ≥ N exact, undo"}
    rows = ["| host | family | role | route | checked / refused because | note |",
            "|:--|:--|:--|:--|:--|:--|"]
    for f in families:
        what = f"refused: {f.refused}" if f.refused else checks[f.role]
        rows.append(f"| {f.host} | {f.name} | {f.role} | {f.route} | {what} | {f.note} |")
    passed = sum(f.refused is None for f in families)
    summary = (f"{len(families)} families: {passed} pass the contract, {len(families) - passed} are refused by "
               "name (`tests/test_family_contract.py` holds every row).")
    return summary + "\n\n" + "\n".join(rows) + "\n"
