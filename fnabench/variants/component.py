"""What a variant component declares about itself, once: :class:`ComponentDecl`.

Each component module (``exact.py``, ``fna.py``, ``nystrom.py``, ``null.py``, ``mask.py``, ``tome.py``,
``visionzip.py``, ``fastv.py``) ends with ``COMPONENT = ComponentDecl(...)``: its name, its role, its keys
and its behaviour. ``components.py`` registers every declaration in one list; the spec grammar
(``spec.py``), :class:`~fnabench.variants.variant.Variant` and the token-flow lookup (``flows.py``) read
everything from there and never branch on a component's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fnabench.variants.params import Param

if TYPE_CHECKING:  # annotations only: spec.py and variant.py import the registry, which imports this module
    import torch

    from fnabench.variants.flow import TokenFlow
    from fnabench.variants.spec import Component

#: an attention core: at most one per spec; where it does not apply, attention is exact
CORE = "core"
#: a modifier of the core's attention (``mask``): at most one per spec
MODIFIER = "modifier"
#: a token flow: changes how many tokens flow through later blocks (patched at block level), with exact only
FLOW = "flow"
ROLES = (CORE, MODIFIER, FLOW)

#: ``attend(component, q, k, v, state, *, scale, attn_mask, key_masked)`` → [B, H, N, d]: a core's
#: (bidirectional) attention where it applies. ``attn_mask`` is None unless the core is ``exact`` (the
#: variant refuses a mask an approximation cannot honour); ``key_masked`` [B, N] bool are the tokens a
#: ``mask:action=keys`` removes as keys, or None
Attend = Callable[..., "torch.Tensor"]
#: ``attend_causal(component, q, k, v, state, *, scale, key_masked)`` → [B, H, N, d]: the same on causal
#: attention (token t sees tokens <= t); a later token must never change an earlier output
AttendCausal = Callable[..., "torch.Tensor"]


@dataclass(frozen=True, eq=False)
class ComponentDecl:
    """One variant component: everything the grammar and the dispatch need to know about it.

    Every role: ``name`` (the word in specs), ``role`` (:data:`CORE`, :data:`MODIFIER` or :data:`FLOW`),
    ``params`` (its keys in the order ``fnabench list variants`` shows them; :class:`Param` gives parser,
    default and what it accepts), ``doc`` (one line), ``always_shown`` (keys the short form shows even at
    their default, because they define the row: ``m``, ``r``, ``tokens``) and ``check`` (a parsed
    component → a message where its keys contradict each other, else None).

    A core: ``attend`` and ``attend_causal`` (see :data:`Attend`, :data:`AttendCausal`), called only where
    the core applies (tower, layers) and, for a core with an ``m`` key, only where m < N and ``fallback=auto``
    did not choose exact; ``exact`` marks the reference core; ``causal_defaults`` the unnamed keys that take
    causal-safe values in decoders; ``leaky_key``/``leaky_values`` the values of a key that let later tokens
    choose what earlier ones attend to; ``key_mask_refusal`` why it cannot run with ``mask:action=keys``.

    A token flow: ``flow_class``, the :class:`~fnabench.variants.flow.TokenFlow` subclass that runs it.
    """

    name: str
    role: str
    params: Mapping[str, Param]
    doc: str
    always_shown: frozenset[str] = frozenset()
    check: Callable[[Component], str | None] | None = None
    # --- cores
    attend: Attend | None = None
    attend_causal: AttendCausal | None = None
    #: exact attention itself: honours any attention mask, is what the others fall back to, and changes a
    #: tower only where the spec names its ``tower`` (``exact`` alone patches nothing that matters)
    exact: bool = False
    causal_defaults: Mapping[str, Any] = field(default_factory=dict)
    leaky_key: str | None = None
    leaky_values: tuple[Any, ...] = ()
    key_mask_refusal: str | None = None
    # --- token flows
    flow_class: type[TokenFlow] | None = None

    def __post_init__(self) -> None:
        where = f"component {self.name!r}"
        if self.role not in ROLES:
            raise ValueError(f"{where}: role {self.role!r}; accepted: {', '.join(ROLES)}")
        if (self.role == CORE) != (self.attend is not None and self.attend_causal is not None):
            raise ValueError(f"{where}: a core declares attend and attend_causal, and only a core does")
        if (self.role == FLOW) != (self.flow_class is not None):
            raise ValueError(f"{where}: a token flow declares its flow_class, and only a token flow does")
        if self.role == FLOW and not {"layers", "tower"} <= set(self.params):
            raise ValueError(f"{where}: a token flow has 'layers' and 'tower' keys")
        named = {*self.always_shown, *self.causal_defaults, *([self.leaky_key] if self.leaky_key else [])}
        if not named <= set(self.params):
            raise ValueError(f"{where}: {', '.join(sorted(named - set(self.params)))} not among its keys")

    @property
    def has_m(self) -> bool:
        """A landmark or segment count ``m``: with m >= N the core is exact attention and runs as such."""
        return "m" in self.params

    @property
    def has_fallback(self) -> bool:
        """A ``fallback`` key: ``fallback=auto`` runs exact attention where the core costs more counted FLOPs."""
        return "fallback" in self.params

    def leaks_future(self, component: Component) -> bool:
        """Whether, on causal attention, later tokens can change earlier outputs of ``component``."""
        return self.leaky_key is not None and component[self.leaky_key] in self.leaky_values


def register(*decls: ComponentDecl) -> dict[str, ComponentDecl]:
    """The registry: name → declaration, in the order given; a name declared twice is refused."""
    out: dict[str, ComponentDecl] = {}
    for decl in decls:
        if decl.name in out:
            raise ValueError(f"component {decl.name!r} registered twice")
        out[decl.name] = decl
    return out
