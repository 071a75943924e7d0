"""transformers attention: every self-attention module that dispatches through ``AttentionInterface``
(transformers ≥ 4.48), encoder or decoder, found by how it attends rather than by its class name.

A module is a site when its class's forward looks its attention function up in ``ALL_ATTENTION_FUNCTIONS``
and it is not cross-attention (``is_cross_attention``, or a decoder's non-causal attention); it is causal
when its own ``is_causal`` says so (or the call passes ``is_causal=True``, as CLIP's text tower does). The
patch registers an ``"fnabench"`` attention function once (transformers_attention.py: what it does with
every argument and mask) and points the tower's config at it, restoring the previous implementation on
removal; weights and forwards stay untouched. Decoders get sdpa's mask function, so a layer sees no mask
(plain causal) or a 4-D boolean one. With ``cache=landmark`` the prefill's cache is replaced, layer by
layer, by the landmark keys with their Nyström values Ṽ plus the real tokens after the last landmark
(kv_cache.py). Token flows patch decoder layers whose forward is the pre-norm pattern (checked on its
source: ``PRE_NORM``) and the encoder layers named in ``ENCODER_LAYERS``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn

from fnabench._errors import UserError
from fnabench._extras import require
from fnabench.patching.sites import (
    AttentionKind,
    BlockKind,
    BlockSite,
    HostAdapter,
    Site,
    install_forward,
    merge_heads,
    split_heads,
)
from fnabench.patching.transformers_attention import (
    IMPLEMENTATION,
    PaddingMaskError,  # noqa: F401  (re-exported: callers catch it from here)
    fnabench_attention,
)

#: "auto" uses AttentionInterface; "swap" forces the module swap on encoders with q/k/v projections
ROUTE = "auto"
LOOKS_FOR = ["transformers self-attention that dispatches through AttentionInterface (ALL_ATTENTION_FUNCTIONS)"]
#: encoder layers a token flow patches: (norm before attention, attention, norm before MLP, MLP) by name;
#: DINOv2's layers also scale each branch (layer_scale1/2) and drop paths
ENCODER_LAYERS = {"CLIPEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
                  "SiglipEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
                  "Dinov2Layer": ("norm1", "attention", "norm2", "mlp"),
                  "Dinov2WithRegistersLayer": ("norm1", "attention", "norm2", "mlp")}
BLOCKS = [*(f"transformers {name}" for name in ENCODER_LAYERS),
          "transformers pre-norm decoder layers (input_layernorm → self_attn → residual, "
          "post_attention_layernorm → mlp → residual)"]


def dispatches_through_interface(module: nn.Module) -> bool:
    """True when the class's forward looks its attention function up in ALL_ATTENTION_FUNCTIONS."""
    forward = type(module).forward
    while hasattr(forward, "__wrapped__"):  # deprecation decorators wrap the real forward
        forward = forward.__wrapped__
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names and hasattr(module, "config")


def is_cross_attention(module: nn.Module) -> bool:
    """Cross-attention by the module's own flags: ``is_cross_attention``, or a decoder's non-causal attention."""
    if getattr(module, "is_cross_attention", False):
        return True
    return bool(getattr(module, "is_decoder", False)) and not getattr(module, "is_causal", False)


def is_site(module: nn.Module) -> bool:
    """A transformers self-attention module fnabench patches (it dispatches through the interface)."""
    return (type(module).__module__.startswith("transformers.") and dispatches_through_interface(module)
            and not is_cross_attention(module))


def is_decoder_attention(module: nn.Module) -> bool:
    """A causal self-attention site (a decoder's; its tower runs the variant's causal form)."""
    return is_site(module) and bool(getattr(module, "is_causal", False))


def _register() -> None:
    tr = require("transformers")
    if tr.AttentionInterface._global_mapping.get(IMPLEMENTATION) is not fnabench_attention:
        tr.AttentionInterface.register(IMPLEMENTATION, fnabench_attention)
    masks = tr.masking_utils.AttentionMaskInterface
    if IMPLEMENTATION not in masks._global_mapping:  # layers build sdpa's masks for fnabench
        masks.register(IMPLEMENTATION, tr.masking_utils.sdpa_mask)


# configs whose implementation fnabench replaced → (original implementation, number of sites)
_ORIGINAL: dict[int, list] = {}


def _cache_hook(module, args, kwargs):
    """Remember the KV cache a decoder layer is called with (the attention function is not given it)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache
    module.__dict__["_fnabench_cache"] = cache


def _install_interface(site: Site):
    _register()
    config = site.module.config
    entry = _ORIGINAL.setdefault(id(config), [config._attn_implementation, 0])
    entry[1] += 1
    config._attn_implementation = IMPLEMENTATION
    hook = site.module.register_forward_pre_hook(_cache_hook, with_kwargs=True) if is_decoder_attention(
        site.module) else None

    def undo() -> None:
        if hook is not None:
            hook.remove()
            site.module.__dict__.pop("_fnabench_cache", None)
        entry[1] -= 1
        if entry[1] == 0:
            config._attn_implementation = entry[0]
            _ORIGINAL.pop(id(config), None)

    return undo


def _install_swap(site: Site):
    attn = site.module
    out_proj = getattr(attn, "out_proj", None) or attn.o_proj
    heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
    scale = getattr(attn, "scale", None) or attn.scaling

    def forward(hidden_states, attention_mask=None, *_args, **_kwargs):
        q, k, v = (split_heads(proj(hidden_states), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = site.attend(q, k, v, scale=scale, attn_mask=attention_mask)
        return out_proj(merge_heads(out)), None

    return install_forward(attn, forward)


def _install(site: Site):
    swappable = all(hasattr(site.module, p) for p in ("q_proj", "k_proj", "v_proj"))
    if ROUTE == "swap" and swappable and not is_decoder_attention(site.module):
        return _install_swap(site)
    return _install_interface(site)


def kinds() -> list[AttentionKind]:
    def matches_encoder(m) -> bool:
        return is_site(m) and not getattr(m, "is_causal", False)

    return [AttentionKind("transformers decoder attention", is_decoder_attention, _install),
            AttentionKind("transformers attention", matches_encoder, _install)]


def explain(model: nn.Module) -> str | None:
    """Why a transformers model holds no site, in words: its attention classes compute attention themselves,
    or all of it is cross-attention. None for a model with no transformers attention module at all."""
    own, cross = set(), set()
    for m in model.modules():
        cls = type(m)
        if not cls.__module__.startswith("transformers.") or "Attention" not in cls.__name__:
            continue
        if dispatches_through_interface(m):
            if is_cross_attention(m):
                cross.add(cls.__name__)
        elif any(isinstance(c, nn.Linear) for c in m.children()):
            own.add(cls.__name__)
    if own:
        return (f"{', '.join(sorted(own))} computes attention itself rather than dispatching through transformers' "
                "AttentionInterface")
    if cross:
        return f"its only dispatching attention ({', '.join(sorted(cross))}) is cross-attention"
    return None


def _install_block(site: BlockSite):
    layer = site.block
    norm1, attn, norm2, mlp = (getattr(layer, n) for n in ENCODER_LAYERS[type(layer).__name__])
    scale1, scale2 = (getattr(layer, n, nn.Identity()) for n in ("layer_scale1", "layer_scale2"))
    drop = getattr(layer, "drop_path", nn.Identity())
    old_api = "output_attentions" in inspect.signature(type(layer).forward).parameters  # transformers 4.x: tuples

    def forward(hidden_states, *args, **kwargs):
        site.enter(hidden_states)
        if old_api:  # 4.x: (hidden_states, attention_mask[, causal_attention_mask], output_attentions)
            kwargs.pop("output_attentions", None)
        mask = kwargs.pop("attention_mask", args[0] if args else None)
        if type(layer).__name__.startswith("Dinov2") and old_api:
            out = attn(norm1(hidden_states))
        else:
            out = attn(norm1(hidden_states), attention_mask=mask)
        out = out[0] if isinstance(out, tuple) else out
        x = site.between(hidden_states + drop(scale1(out)))
        x = x + drop(scale2(mlp(norm2(x))))
        return (x,) if old_api else x

    return install_forward(layer, forward)


#: the pre-norm decoder layer's forward, statement by statement, as a token flow re-runs it (dropouts aside)
PRE_NORM = ("residual = hidden_states", "hidden_states = self.input_layernorm(hidden_states)", "self_attn",
            "hidden_states = residual + hidden_states", "residual = hidden_states",
            "hidden_states = self.post_attention_layernorm(hidden_states)", "mlp",
            "hidden_states = residual + hidden_states")


class UnsupportedLayerError(UserError, TypeError):
    """A decoder layer whose forward is not the pre-norm pattern a token flow re-runs."""


class _NoDropout(ast.NodeTransformer):
    """``self.resid_dropout(x)`` → ``x``: dropouts are the identity in eval mode."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self"
                and ("dropout" in func.attr or func.attr.endswith("_drop")) and len(node.args) == 1):
            return node.args[0]
        return node


def _statements(cls: type) -> list[str] | None:
    """The forward's top-level statements that touch the residual stream, normalised (None: no source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    out = []
    for stmt in _NoDropout().visit(tree).body[0].body:
        if not isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            continue
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if not names & {"hidden_states", "residual"}:
            continue
        text = ast.unparse(stmt)
        value = stmt.value
        call = value.value if isinstance(value, ast.Subscript) else value
        callee = ast.unparse(call.func) if isinstance(call, ast.Call) else ""
        if callee in ("self.self_attn", "self.mlp"):
            text = callee.removeprefix("self.")
        if text != "hidden_states = hidden_states":  # what a stripped dropout leaves
            out.append(text)
    return out


def decoder_layer_problem(layer: nn.Module) -> str | None:
    """Why a token flow cannot re-run this decoder layer (None: its forward is the pre-norm pattern)."""
    name = type(layer).__name__
    missing = [n for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
               if not isinstance(getattr(layer, n, None), nn.Module)]
    if missing:
        return f"{name} has no {', '.join(missing)} (not a pre-norm decoder layer)"
    statements = _statements(type(layer))
    if statements is None:
        return f"{name}'s forward has no source to check"
    if tuple(statements) != PRE_NORM:
        pairs = [(got, want) for got, want in zip(statements, PRE_NORM, strict=False) if got != want]
        if pairs:
            differs = f"`{pairs[0][0]}` where it expects `{pairs[0][1]}`"
        elif len(statements) < len(PRE_NORM):
            differs = f"the residual stream stops after `{statements[-1]}`" if statements else "no residual stream"
        else:
            differs = f"`{statements[len(PRE_NORM)]}` after the pattern's end"
        return f"{name}'s forward is not the pre-norm pattern ({differs})"
    return None


def _install_decoder_block(site: BlockSite):
    layer = site.block
    problem = decoder_layer_problem(layer)
    if problem is not None:
        raise UnsupportedLayerError(f"token flows re-run whole decoder layers, and {problem}; accepted: pre-norm "
                                    "layers (Llama, Mistral, Qwen2/3, OLMo, ...)")

    def forward(hidden_states, *args, **kwargs):
        if args:  # transformers passes everything but the hidden states by keyword; an old caller: the mask
            kwargs = {"attention_mask": args[0], **kwargs}
        site.enter(hidden_states)
        narrow = getattr(site.state.flow, "inputs_for", None)
        if narrow is not None:  # positions and masks follow the tokens a flow kept
            kwargs = narrow(hidden_states.shape[1], kwargs)
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        x = site.between(hidden_states + (out[0] if isinstance(out, tuple) else out))
        mlp = layer.mlp(layer.post_attention_layernorm(x))
        return x + (mlp[0] if isinstance(mlp, tuple) else mlp)

    return install_forward(layer, forward)


def block_kinds() -> list[BlockKind]:
    def matches(m) -> bool:
        cls = type(m)
        return cls.__name__ in ENCODER_LAYERS and cls.__module__.startswith("transformers.")

    def matches_decoder(m) -> bool:  # the install checks the pattern and refuses a layer that differs by name
        attn = getattr(m, "self_attn", None)
        return type(m).__module__.startswith("transformers.") and attn is not None and is_decoder_attention(attn)

    return [BlockKind("transformers encoder layer", matches, _install_block),
            BlockKind("transformers decoder layer", matches_decoder, _install_decoder_block)]


def _image_token_id(config) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def install_owner(model: nn.Module, states: dict) -> list:
    """On a multimodal model whose language model is patched: a pre-hook on the module that receives
    ``input_ids`` (LLaVA's ``model.model``) marks the image tokens of each forward in the text tower's state
    (``guarantee=text``, FastV-style pruning). Returns the undo callables."""
    state = states.get("text")
    if state is None:
        return []
    undo = []
    for module in model.modules():
        token = _image_token_id(getattr(module, "config", None))
        if token is None or not hasattr(module, "language_model") or type(module).__name__.endswith("Generation"):
            continue

        def mark(_module, args, kwargs, token=token):
            ids = kwargs.get("input_ids", args[0] if args else None)
            state.image_tokens = None if ids is None else ids == token

        def clear(*_args):  # a later call of the language model on its own must not see stale marks
            state.image_tokens = None

        undo.append(module.register_forward_pre_hook(mark, with_kwargs=True).remove)
        undo.append(module.register_forward_hook(clear).remove)
    if undo:
        undo.append(lambda: setattr(state, "image_tokens", None))
    return undo


ADAPTER = HostAdapter("transformers", tuple(LOOKS_FOR), kinds, blocks=tuple(BLOCKS), block_kinds=block_kinds,
                      install_owner=install_owner, explain=explain)
