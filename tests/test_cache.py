"""One cache folder and one hash recipe (fnabench/data/cache.py), and the names cached things already have."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fnabench.data.cache import cache_root, content_hash
from fnabench.tasks.recall import task as recall_task


def test_cache_root_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("FNABENCH_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("FNABENCH_CACHE", "")  # empty counts as unset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "fnabench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "fnabench"


def test_recall_runs_live_under_the_one_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FNABENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert recall_task.cache_root() == tmp_path / "fnabench" / "recall"


def test_content_hash_is_the_recipe_the_cached_names_were_made_with():
    """The folder names of models trained before the recipe had one home: the same digits, so nothing retrains."""
    config = recall_task.get_preset("cpu")
    folder, _ = recall_task.run_folder("cpu", 0)
    old = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]  # the old recipe
    assert folder.name == f"cpu-seed0-{old}"
    recipe = {"sizes": (1, 2), "name": "x"}
    assert content_hash(recipe, 10, default=list) == \
        hashlib.sha1(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()[:10]
    assert len(content_hash([1, 2], 8)) == 8
