"""fnabench's one cache folder and its one content-hash recipe for the names of things built on first use.

Folders under the cache keep the names they had when each producer had its own rule (``classifiers/``,
``vqa/llava-shapes-<hash>``, ``recall/<preset>-seed<N>-<hash>``, ``shapes-v…``, ``seg-synthetic-v…``), so no
cached model is rebuilt because this module exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """fnabench's cache folder: ``$FNABENCH_CACHE``, else ``$XDG_CACHE_HOME/fnabench``, else ``~/.cache/fnabench``
    (an empty variable counts as unset)."""
    if os.environ.get("FNABENCH_CACHE"):
        return Path(os.environ["FNABENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fnabench"


def content_hash(obj: Any, length: int = 10, default: Callable[[Any], Any] | None = None) -> str:
    """The first ``length`` hex digits of the SHA-1 of ``obj`` as sorted-key JSON: a recipe's name in the cache."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()[:length]
