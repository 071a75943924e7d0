"""Finding attention modules in a host model, patching them reversibly, and the patch handle.

Each host adapter (one module per host library, declaring one :class:`~fnabench.patching.sites.HostAdapter`,
listed in patching/hosts.py) contributes :class:`AttentionKind` objects (which modules it recognises and how
to install a forward that calls the variant). This module does the rest, the same for every host:
group the modules into towers by the block list they sit in, attach one :class:`ForwardState` per
tower, hook each block to record the residual stream, and undo all of it on ``remove()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fnabench._errors import UserError
from fnabench.patching.hosts import loaded_hosts
from fnabench.patching.sites import AttentionKind, BlockKind, BlockSite, Site
from fnabench.variants import ForwardState, Variant, parse_variant
from fnabench.variants.flows import flow_class, make_flow

#: attribute that marks a patched model and holds its handle (not a module: state dict unchanged)
HANDLE_ATTR = "_fnabench_patch"
_TEXT_ROOTS = {"text", "text_model", "text_encoder", "transformer", "language_model"}


class UnsupportedModelError(UserError, TypeError):
    """The model holds no attention module any adapter can patch."""


class AlreadyPatchedError(RuntimeError):
    """The model is patched already; remove the first patch before applying another."""










def _kinds() -> tuple[list[AttentionKind], list[str]]:
    """Attention kinds of every host library already imported, and labels of all that could be."""
    kinds, labels = [], []
    for adapter, loaded in loaded_hosts():
        labels.extend(adapter.looks_for)
        if loaded:
            kinds.extend(adapter.kinds())
    return kinds, labels


def _block_kinds() -> tuple[list[BlockKind], list[str]]:
    """Block kinds (for token flows) of every host library already imported, and labels of all."""
    kinds, labels = [], []
    for adapter, loaded in loaded_hosts():
        labels.extend(adapter.blocks)
        if loaded and adapter.block_kinds is not None:
            kinds.extend(adapter.block_kinds())
    return kinds, labels


def _block_of(model: nn.Module, name: str) -> tuple[str, str, int, int]:
    """(block path, block-list path, layer index, list length) for the module at ``name``.

    The block is the nearest ancestor that is an indexed child of a ModuleList/Sequential.
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if not parts[cut].isdigit():
            continue
        parent_path = ".".join(parts[:cut])
        parent = model.get_submodule(parent_path)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[: cut + 1]), parent_path, int(parts[cut]), len(parent)
    parent_path = ".".join(parts[:-1])
    return parent_path, parent_path, 0, 1


def _tower_of(list_path: str) -> str:
    parts = list_path.split(".")
    # a LLaVA-family model keeps its language model at model.language_model, beside the vision tower
    return "text" if parts[0] in _TEXT_ROOTS or "language_model" in parts else "image"


def _num_prefix(model: nn.Module, list_path: str, tower: str) -> int:
    """CLS and register tokens in front of the patch tokens, read off the tower's own modules."""
    if tower == "text":
        return 0
    parts = list_path.split(".") if list_path else []
    for cut in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:cut])) if cut else model
        if isinstance(getattr(owner, "num_prefix_tokens", None), int):  # timm
            return owner.num_prefix_tokens
        if isinstance(getattr(owner, "cls_token", None), torch.Tensor):  # mmseg ViT/BEiT/MAE
            return 0 if getattr(owner, "with_cls_token", True) is False else 1
        if getattr(owner, "class_embedding", None) is not None and isinstance(owner.class_embedding, torch.Tensor):
            return 1  # open_clip VisionTransformer
        emb = getattr(owner, "embeddings", None)
        if isinstance(emb, nn.Module):  # transformers
            regs = getattr(emb, "register_tokens", None)
            n_reg = regs.shape[1] if isinstance(regs, torch.Tensor) else 0
            n_reg += getattr(emb, "distillation_token", None) is not None  # DeiT's second prefix token
            if getattr(emb, "cls_token", None) is not None or getattr(emb, "class_embedding", None) is not None:
                return 1 + n_reg
            return n_reg
    return 0


def _residual_hook(state: ForwardState, layer: int):
    def hook(_module, args, kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        state.begin_layer(layer, x if isinstance(x, torch.Tensor) and x.dim() == 3 else None)

    return hook


@dataclass
class PatchHandle:
    """A live patch: a context manager; ``remove()`` restores every original forward exactly."""

    model: nn.Module
    variant: Variant
    sites: list[Site]
    states: dict[str, ForwardState]
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    active: bool = True

    def remove(self) -> None:
        """Undo the patch (idempotent)."""
        if not self.active:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self.model.__dict__.get(HANDLE_ATTR) is self:
            del self.model.__dict__[HANDLE_ATTR]
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def layers(self, tower: str = "image") -> int:
        """Number of blocks in ``tower``."""
        return self.states[tower].num_layers

    def __repr__(self) -> str:
        towers = ", ".join(f"{t}: {s.num_layers} blocks" for t, s in self.states.items())
        return f"PatchHandle({self.variant.canonical!r}, {towers}, active={self.active})"


def discover(model: nn.Module) -> list[tuple[str, nn.Module, AttentionKind]]:
    """Every attention module an adapter recognises, as (name, module, kind) in module order."""
    kinds, labels = _kinds()
    found = []
    for name, module in model.named_modules():
        kind = next((k for k in kinds if k.matches(module)), None)
        if kind is not None:
            found.append((name, module, kind))
    if not found:
        reasons = [reason for adapter, loaded in loaded_hosts() if loaded and adapter.explain is not None
                   for reason in [adapter.explain(model)] if reason]
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise UnsupportedModelError(
            f"cannot patch {type(model).__name__}: no attention module found{why}; looked for {', '.join(labels)}"
        )
    return found


def find_blocks(model: nn.Module, tower: str = "image") -> list[nn.Module]:
    """The blocks of ``tower`` (the modules holding its attention), in layer order."""
    blocks = []
    for name, _, _ in discover(model):
        block_path, list_path, layer, _ = _block_of(model, name) if name else ("", "", 0, 1)
        if _tower_of(list_path) == tower:
            blocks.append((layer, model.get_submodule(block_path) if block_path else model))
    return [b for _, b in sorted(blocks, key=lambda t: t[0])]


def patch(model: nn.Module, spec: str | Variant, *, num_prefix: int | None = None) -> PatchHandle:
    """Patch ``model``'s attention in place with the variant ``spec``; returns a reversible handle.

    Only the towers the variant names are touched (the image tower unless ``tower=text|all``).
    ``num_prefix`` overrides the detected number of CLS/register tokens.
    """
    variant = parse_variant(spec)
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() needs a torch.nn.Module, got {type(model).__name__}")
    existing = model.__dict__.get(HANDLE_ATTR)
    if existing is not None and existing.active:
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched with {existing.variant.canonical!r}; "
            "call .remove() on that handle first"
        )
    found = discover(model)
    for name, module, _ in found:
        if "_fnabench_site" in module.__dict__:
            raise AlreadyPatchedError(f"module {name or type(module).__name__} is already patched by fnabench")

    wanted = variant.towers()
    present = {_tower_of(_block_of(model, n)[1]) if n else "image" for n, _, _ in found}
    # a model with one tower (an LM, a ViT) is patched whatever it is called, unless tower= names another
    only = len(present) == 1 and (wanted == {"image"} or present <= wanted)
    if only:
        wanted = present
    states: dict[str, ForwardState] = {}
    sites: list[Site] = []
    for name, module, kind in found:
        block_path, list_path, layer, depth = _block_of(model, name) if name else ("", "", 0, 1)
        tower = _tower_of(list_path)
        if tower not in wanted:
            continue
        if tower not in states:
            prefix = _num_prefix(model, list_path, tower) if num_prefix is None else num_prefix
            states[tower] = ForwardState(tower=tower, num_layers=depth, num_prefix=prefix, only_tower=only)
        states[tower].causal |= bool(getattr(module, "is_causal", False)) and "decoder" in kind.label
        block = model.get_submodule(block_path) if block_path else model
        sites.append(Site(name, module, kind, block, layer, states[tower], variant, listed=block_path != list_path))
    if not sites:
        present = sorted({_tower_of(_block_of(model, n)[1]) for n, _, _ in found if n})
        raise UnsupportedModelError(
            f"{variant.canonical!r} targets tower(s) {sorted(wanted)} but {type(model).__name__} "
            f"has attention only in {present}; accepted: tower=" + "|".join([*present, "all"])
        )

    variant.check_depth({tower: state.num_layers for tower, state in states.items()})
    if states and all(state.causal for state in states.values()):
        variant = variant.for_causal()  # what runs in a decoder: causal-safe defaults, named in the string
        for site in sites:
            site.variant = variant
    handle = PatchHandle(model, variant, sites, states)
    try:
        for site in sites:
            hook = site.block.register_forward_pre_hook(_residual_hook(site.state, site.layer), with_kwargs=True)
            handle._undo.append(hook.remove)
            site.module.__dict__["_fnabench_site"] = site
            handle._undo.append(lambda m=site.module: m.__dict__.pop("_fnabench_site", None))
            handle._undo.append(site.kind.install(site))
        if variant.flow is not None:
            _install_flow(model, variant, sites, states, handle)
        for adapter, loaded in loaded_hosts():  # model-level hooks (a multimodal model marks its image tokens)
            if loaded and adapter.install_owner is not None:
                handle._undo.extend(adapter.install_owner(model, states))
    except Exception:
        handle.remove()
        raise
    model.__dict__[HANDLE_ATTR] = handle
    return handle


def _install_flow(model: nn.Module, variant: Variant, sites: list[Site], states: dict[str, ForwardState],
                  handle: PatchHandle) -> None:
    """Token flow: a flow state per tower, each block patched to call it, the last block's output restored."""
    cls = flow_class(variant.flow.name)
    for tower, state in states.items():
        if state.causal != cls.causal:
            runs, where = (("causal decoders", "a multimodal model's language model (tower=text)") if cls.causal else
                           ("encoders", "image encoders (timm, open_clip, transformers, mmseg)"))
            kind = "a causal decoder" if state.causal else "an encoder"
            raise UnsupportedModelError(f"{variant.flow.name} runs in {runs}, and the {tower} tower of "
                                        f"{type(model).__name__} is {kind}; accepted: {where}")
    kinds, labels = _block_kinds()
    for state in states.values():
        state.flow = make_flow(variant.flow, state.num_layers, state.num_prefix, state)
        handle._undo.append(lambda s=state: setattr(s, "flow", None))
    blocks: dict[int, Site] = {}
    for site in sites:
        if site.listed:  # a pooling head's attention after the blocks keeps its own forward
            blocks.setdefault(id(site.block), site)
    for site in blocks.values():
        kind = next((k for k in kinds if k.matches(site.block)), None)
        if kind is None:
            raise UnsupportedModelError(f"{variant.flow.name} patches whole blocks, and {type(site.block).__name__} "
                                        f"(holding {site.name}) is not one fnabench knows; "
                                        f"accepted: {', '.join(labels)}")
        block_site = BlockSite(site.block, site.layer, site.state)
        site.block.__dict__["_fnabench_flow"] = site.state
        handle._undo.append(lambda b=site.block: b.__dict__.pop("_fnabench_flow", None))
        handle._undo.append(kind.install(block_site))
        if site.layer == site.state.num_layers - 1:  # the tower's end: every input position gets its token back
            hook = site.block.register_forward_hook(_finish_hook(site.state))
            handle._undo.append(hook.remove)
    for adapter, loaded in loaded_hosts():
        if loaded and adapter.install_flow_owner is not None:
            handle._undo.extend(adapter.install_flow_owner(model))


def _finish_hook(state: ForwardState):
    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (state.flow.finish(output[0]), *output[1:])
        return state.flow.finish(output)

    return hook











