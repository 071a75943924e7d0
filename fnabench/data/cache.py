"""fnabench's one cache folder and its one content-hash recipe for the names of things built on first use.

Folders under the cache keep the names they had when each producer had its own rule (``classifiers/``,
``vqa/llava-shapes-<hash>``, ``recall/<preset>-seed<N>-<hash>``, ``shapes-v…``, ``seg-synthetic-v…``), so no
cached model is rebuilt because this module exists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from fnabench._io import cache_root  # noqa: F401  (the cache folder, defined at the bottom layer for compiled ops)


def content_hash(obj: Any, length: int = 10, default: Callable[[Any], Any] | None = None) -> str:
    """The first ``length`` hex digits of the SHA-1 of ``obj`` as sorted-key JSON: a recipe's name in the cache."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()[:length]
