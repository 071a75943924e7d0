"""The model and task contracts, driven by the registries (``fnabench list`` shows the same keys): every
registered key resolves to a loader or factory of the documented signature, says in words what it is, and
answers a name it cannot serve with one line (exit 2) instead of a traceback. A new key is tested here
without anyone writing a test for it."""

from __future__ import annotations

import inspect

import pytest
import torch

from fnabench._errors import UserError
from fnabench.models.loaded import LoadedModel
from fnabench.models.registry import MODELS, load_model
from fnabench.tasks.registry import TASKS, make_task

#: task prefixes whose host suite checks the dataset name when the task runs, not when it is built
SUITE_CHECKS_NAME = {"clip_benchmark", "lmms"}


def _one_line_user_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    text = str(err.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("key", MODELS.names())
def test_every_model_key_resolves_to_a_loader_and_says_what_it_is(key):
    loader, _ = MODELS.resolve(key if ":" in key else f"{key}:x")
    params = inspect.signature(loader).parameters
    assert "image_size" in params and params["image_size"].kind is inspect.Parameter.KEYWORD_ONLY
    assert dict(MODELS.describe())[key], f"{key} has no help text for `fnabench list`"


@pytest.mark.parametrize("key", [k for k in MODELS.names() if ":" not in k])
def test_every_model_prefix_refuses_an_unknown_name_in_one_line(key):
    _one_line_user_error(lambda: load_model(f"{key}:no-such-model-xyz"))


@pytest.mark.parametrize("key", [k for k in MODELS.names() if k.startswith("tiny:")])
def test_every_tiny_model_loads_and_embeds(key):
    loaded = load_model(key)
    assert isinstance(loaded, LoadedModel) and loaded.name == key
    with torch.no_grad():
        out = loaded.embed(torch.randn(1, 3, loaded.image_size, loaded.image_size))
    assert out.shape[0] == 1 and torch.isfinite(out).all()


def test_unknown_model_and_task_names_list_what_is_accepted():
    assert "accepted:" in _one_line_user_error(lambda: load_model("no-such-prefix:x"))
    assert "accepted:" in _one_line_user_error(lambda: make_task("no-such-prefix:x"))


@pytest.mark.parametrize("key", TASKS.names())
def test_every_task_prefix_resolves_and_refuses_what_it_cannot_serve(key):
    factory, _ = TASKS.resolve(f"{key}:x")
    assert callable(factory)
    assert dict(TASKS.describe())[key], f"{key} has no help text for `fnabench list`"
    if key not in SUITE_CHECKS_NAME:
        assert "accepted" in _one_line_user_error(lambda: make_task(f"{key}:no-such-thing"))
