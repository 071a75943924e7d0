"""The registry of variant components: one line per component, and the views the grammar reads.

A new component is one module that ends with ``COMPONENT = ComponentDecl(...)`` (variants/component.py
says what it declares) and one line in :data:`DECLARATIONS` below. The order is the order
``fnabench list variants`` shows them in.
"""

from __future__ import annotations

from fnabench.variants import exact, fastv, fna, mask, null, nystrom, tome, visionzip
from fnabench.variants.component import CORE, FLOW, MODIFIER, ComponentDecl, register

DECLARATIONS: dict[str, ComponentDecl] = register(
    exact.COMPONENT,
    fna.COMPONENT,
    nystrom.COMPONENT,
    mask.COMPONENT,
    null.COMPONENT,
    tome.COMPONENT,
    visionzip.COMPONENT,
    fastv.COMPONENT,
)

#: attention cores: at most one per spec
CORES = tuple(name for name, decl in DECLARATIONS.items() if decl.role == CORE)
#: modifiers of the core's attention: at most one per spec
MODIFIERS = tuple(name for name, decl in DECLARATIONS.items() if decl.role == MODIFIER)
#: token-flow components: they change how many tokens flow through later blocks (patched at block level)
FLOW_COMPONENTS = tuple(name for name, decl in DECLARATIONS.items() if decl.role == FLOW)
#: the reference core: a spec's core where it names none, what approximations fall back to, what flows run with
EXACT = next(name for name, decl in DECLARATIONS.items() if decl.exact)
