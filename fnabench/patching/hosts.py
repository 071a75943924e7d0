"""Every host adapter, one line each, in the order they are tried (the first kind that matches a module wins)."""

from __future__ import annotations

import sys

from fnabench.patching import mmseg, open_clip, timm, torch_mha, transformers
from fnabench.patching.sites import HostAdapter

HOSTS: tuple[HostAdapter, ...] = (
    open_clip.ADAPTER,
    timm.ADAPTER,
    transformers.ADAPTER,
    mmseg.ADAPTER,
    torch_mha.ADAPTER,
)


def loaded_hosts() -> list[tuple[HostAdapter, bool]]:
    """(adapter, whether its host library is imported) for every adapter; only loaded ones are consulted."""
    return [(adapter, adapter.host == "torch" or adapter.host in sys.modules) for adapter in HOSTS]
