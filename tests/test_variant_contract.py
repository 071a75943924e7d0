"""The contract every registered variant component keeps, parametrised over the registry.

A component registered in ``fnabench/variants/components.py`` is tested here without anyone writing a test
for it (as timm's tests run over ``list_models()``): its spec strings round-trip, its declaration is
well-formed, a core with ``m`` is exact attention at m >= N, every core is causal where it runs causally, and
every component patches a tiny host and unpatches to bit-identical outputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed_after

import fnabench
from fnabench.variants import ForwardState, parse_variant
from fnabench.variants.component import CORE, FLOW, MODIFIER, ROLES
from fnabench.variants.components import CORES, DECLARATIONS, EXACT, FLOW_COMPONENTS, MODIFIERS
from fnabench.variants.flow import TokenFlow
from fnabench.variants.flows import flow_class
from fnabench.variants.params import Param, format_value
from fnabench.variants.spec import COMPONENTS

NAMES = list(DECLARATIONS)
M_CORES = [n for n in CORES if DECLARATIONS[n].has_m]


def _part(variant, name: str):
    """The component called ``name`` among a variant's core, mask and flow."""
    return next(c for c in (variant.core, variant.mask, variant.flow) if c is not None and c.name == name)


def _other_value(param: Param) -> str | None:
    """A spelling of a valid value of ``param`` other than its default, or None where it has only one."""
    candidates = [o.strip() for o in param.accepts.split("|")]
    default = param.default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        candidates += [format_value(default * 2), format_value(default + 1)]
    candidates += ["2", "0.5", "-1", "1:"]
    for text in candidates:
        try:
            value = param.parse(text)
            ok = param.check(value)
        except (ValueError, TypeError):
            continue
        if ok and value != default:
            return text
    return None


def _every_key_changed(name: str) -> tuple[str, dict[str, str]]:
    """``name`` with every key that has another valid value set to it: (spec, {key: spelling})."""
    changed = {k: t for k, p in DECLARATIONS[name].params.items() if (t := _other_value(p)) is not None}
    return name + ":" + ",".join(f"{k}={t}" for k, t in changed.items()), changed


def _small(name: str, **extra) -> str:
    """``name`` with the integer keys that define its row (``m``, ``r``, ``tokens``) at 4: runs on tiny inputs."""
    decl = DECLARATIONS[name]
    keys = {k: 4 for k in sorted(decl.always_shown) if isinstance(decl.params[k].default, int)} | extra
    return name + (":" + ",".join(f"{k}={v}" for k, v in keys.items()) if keys else "")


# ---------------------------------------------------------------------------------------------
# the declaration and the grammar


@pytest.mark.parametrize("name", NAMES)
def test_declaration_is_well_formed(name):
    decl = DECLARATIONS[name]
    assert decl.name == name and decl.role in ROLES and decl.doc.strip()
    assert name in {CORE: CORES, MODIFIER: MODIFIERS, FLOW: FLOW_COMPONENTS}[decl.role]
    assert COMPONENTS[name] == dict(decl.params)  # the mapping callers read (cli list, tune, llava)
    for key, param in decl.params.items():
        assert param.check(param.default), key  # a default is a valid value ...
        assert param.parse(format_value(param.default)) == param.default, key  # ... and survives its own string
    if decl.role == FLOW:
        assert issubclass(flow_class(name), TokenFlow)
    else:
        with pytest.raises(KeyError):
            flow_class(name)
    for key, value in decl.causal_defaults.items():
        assert decl.params[key].check(value), key
    if decl.leaky_key is not None:
        assert decl.causal_defaults.get(decl.leaky_key) not in decl.leaky_values  # causal-safe means no leak


@pytest.mark.parametrize("name", NAMES)
def test_default_spec_parses_and_round_trips(name):
    variant = parse_variant(name)
    component = _part(variant, name)
    assert component.values == {k: p.default for k, p in DECLARATIONS[name].params.items()}
    assert parse_variant(variant.canonical).canonical == variant.canonical
    assert parse_variant(variant.short).canonical == variant.canonical  # the short form is a spec too
    causal = variant.for_causal()
    assert parse_variant(causal.canonical).canonical == causal.canonical
    if DECLARATIONS[name].role != CORE:
        assert variant.core.name == EXACT  # a modifier or a flow alone runs on exact attention


@pytest.mark.parametrize("name", NAMES)
def test_every_key_at_a_non_default_value_round_trips(name):
    spec, changed = _every_key_changed(name)
    assert changed, f"{name}: no key with a second valid value"
    variant = parse_variant(spec)
    component = _part(variant, name)
    assert component.given == set(changed)
    for key in changed:
        assert component[key] != DECLARATIONS[name].params[key].default, key
        assert f"{key}=" in component.canonical  # a value off its default is always in the identity
    assert parse_variant(variant.canonical).canonical == variant.canonical
    assert parse_variant(variant.canonical) == variant


# ---------------------------------------------------------------------------------------------
# cores: exactness at m >= N, causality


def _qkv(n=16, b=2, h=3, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))


def _state(n: int, causal: bool, residual=None) -> ForwardState:
    state = ForwardState("image", 1, num_prefix=1, causal=causal, only_tower=True)
    state.begin_layer(0, residual if residual is not None else torch.randn(2, n, 8, dtype=torch.float64))
    return state


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", M_CORES)
def test_m_at_least_n_is_exact_attention(name, causal):
    q, k, v = _qkv()
    n = q.shape[2]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # in float64 throughout
    for m in (n, n + 5):
        out = parse_variant(f"{name}:m={m}").attend(q, k, v, _state(n, causal), causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CORES)
def test_future_tokens_never_change_earlier_outputs(name):
    """With the causal-safe defaults (``for_causal``), output t depends on tokens <= t only."""
    variant = parse_variant(_small(name)).for_causal()
    assert not variant.leaks_future
    q, k, v = _qkv()
    n = q.shape[2]
    residual = torch.randn(2, n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = variant.attend(q, k, v, _state(n, True, residual), causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    for t in (0, 5, n - 2):
        later = residual.clone()
        later[:, t + 1:] *= 10
        changed = variant.attend(*perturbed_after((q, k, v), t), _state(n, True, later), causal=True)
        torch.testing.assert_close(changed[:, :, : t + 1], out[:, :, : t + 1], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# every component patched into a tiny host, and unpatched


def _tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=0, embed_dim=48, num_heads=3).eval()
    return model, (torch.randn(2, 3, 32, 32),), {}


def _tiny_llava():
    pytest.importorskip("transformers")
    from fnabench.models.offline import llava_shapes_arch as arch

    model = arch.build_model(arch.TINY, tiny_tower=True)
    ids = torch.tensor([[arch.BOS] + [arch.IMAGE] * arch.TINY.image_tokens + list(range(5, 13))])
    return model, (), {"input_ids": ids, "pixel_values": torch.randn(1, 3, arch.TINY.image_size, arch.TINY.image_size)}


def _run(model, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", NAMES)
def test_patching_a_tiny_host_and_removing_the_patch_restores_it_bit_exactly(name):
    """A component that runs in an image tower patches a tiny timm ViT; one that runs only in a language model
    (FastV-style) a tiny random LLaVA (built in memory: a language model holding image tokens)."""
    towers = DECLARATIONS[name].params["tower"].accepts.split(" | ") if "tower" in DECLARATIONS[name].params \
        else ["image"]
    model, args, kwargs = _tiny_vit() if "image" in towers else _tiny_llava()
    spec = _small(name)
    keys = list(model.state_dict())
    weights = {k: t.clone() for k, t in model.state_dict().items()}
    ref = _run(model, args, kwargs)
    handle = fnabench.patch(model, spec)
    try:
        patched = _run(model, args, kwargs)
        assert list(model.state_dict()) == keys
    finally:
        handle.remove()
    assert patched.shape == ref.shape and torch.isfinite(patched).all()
    decl = DECLARATIONS[name]
    if decl.role == FLOW or (decl.role == CORE and not decl.exact):
        assert not torch.equal(patched, ref), f"{spec} changed nothing: the test would not exercise it"
    assert torch.equal(_run(model, args, kwargs), ref)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
