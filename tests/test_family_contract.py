"""The family contract over the tiny-model registry (``fnabench.patching.families``), parametrised like timm's
model tests: every declared family is built small and random and either keeps fnabench's promises or is
refused in one line that names what it lacks, exactly as its declaration says.

- every family: ``exact`` changes nothing (1e-5; in a family whose approximation is refused too, e.g. Gemma-2's
  soft-capped logits, gpt-oss's sinks, Falcon's ALiBi), FNA with m >= N equals exact (1e-5), a small m changes the
  output (the patch is live), ``remove()`` restores the model bit for bit;
- decoders and causal encoders: FNA at a small m never lets a later token change an earlier output (exactly);
- decoders: greedy ``generate()`` under FNA with m >= N gives exact's tokens with ``cache=full`` and
  ``cache=landmark``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fnabench
from fnabench._errors import UserError
from fnabench.patching.families import Family, all_families, support_table

FAMILIES = all_families()
T = 17  # decoders: positions <= T keep their outputs when the tokens after T change


def _installed(family: Family) -> bool:
    return importlib.util.find_spec(family.host) is not None


def _perturb_after(x, t: int, vocab: int):
    y = x.clone()
    gen = torch.Generator().manual_seed(7)
    y[:, t + 1:] = torch.randint(0, vocab, y[:, t + 1:].shape, generator=gen)
    assert not torch.equal(x, y)
    return y


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _route(model) -> str:
    """How the live patch reached attention: a registered interface function, or replaced forwards."""
    configs = [getattr(m, "config", None) for m in model.modules()]
    names = {getattr(c, "_attn_implementation", None) for c in configs if c is not None}
    return "interface" if "fnabench" in names else "forward"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.label.replace(" ", ":"))
def test_family_contract(family: Family):
    if not _installed(family):
        pytest.skip(f"{family.host} is not installed")
    torch.manual_seed(0)
    model, x, out = family.make()
    with torch.no_grad():
        before = out(model, x)
        if family.refused is not None:
            with pytest.raises(UserError) as err, fnabench.patch(model, "fna:m=4"):
                out(model, x)
            message = str(err.value)
            assert family.refused in message and "\n" not in message, message
            assert torch.equal(out(model, x), before)
            try:  # where only the approximation is refused, exact runs every feature the family has
                handle = fnabench.patch(model, "exact")
            except UserError:
                return
            with handle:
                assert _max_diff(out(model, x), before) <= 1e-5
            return
        cache = "" if "landmark" in family.caches else ",cache=full"
        with fnabench.patch(model, "exact"):
            assert _max_diff(out(model, x), before) <= 1e-5
        with fnabench.patch(model, f"fna:m=512{cache}"):  # m >= N: exact attention through the patched route
            assert _route(model) == family.route
            assert _max_diff(out(model, x), before) <= 1e-5
        with fnabench.patch(model, f"fna:m=4{cache}") as handle:
            live = out(model, x)
            if family.live:
                assert _max_diff(live, before) > 1e-4, "the patch is not live"
            else:  # every layer rightly runs exact (a binding sliding window), and says why
                assert _max_diff(live, before) <= 1e-5
                for state in handle.states.values():
                    assert sorted(state.exact_because) == list(range(state.num_layers)), state.exact_because
            if family.role != "encoder":
                vocab = int(x.max()) + 1 if family.role == "causal encoder" else model.config.vocab_size
                y = _perturb_after(x, T, vocab)
                assert torch.equal(out(model, y)[:, :T + 1], live[:, :T + 1]), "a later token changed an earlier output"
        assert torch.equal(out(model, x), before)
    if family.role == "decoder":
        prompt = x[:, :24]
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            exact = model.generate(prompt, **kwargs)
            for cache in ("full", "landmark"):
                with fnabench.patch(model, f"fna:m=512,cache={cache}"):
                    if cache in family.caches:
                        assert torch.equal(model.generate(prompt, **kwargs), exact), cache
                    else:
                        with pytest.raises(UserError, match="accepted: cache=full"):
                            model.generate(prompt, **kwargs)


def test_registry_is_wide():
    """The issue's floor: 25 transformers decoder families, 8 encoders, 10 timm architectures, open_clip's towers."""
    by = {(f.host, f.role == "decoder") for f in FAMILIES}
    assert by
    count = lambda host, decoder=None: sum(  # noqa: E731
        f.host == host and (decoder is None or (f.role == "decoder") == decoder) for f in FAMILIES)
    assert count("transformers", True) >= 25
    assert count("transformers", False) >= 8
    assert count("timm") >= 10
    assert count("open_clip") >= 2


def test_support_table_lists_every_family():
    table = support_table()
    for f in FAMILIES:
        assert f"| {f.host} | {f.name} |" in table
    assert f"{len(FAMILIES)} families" in table


def test_docs_support_page_is_the_table():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "support.md").read_text()
    assert page.endswith(support_table()), "docs/support.md is stale: regenerate it with `fnabench list hosts`"
