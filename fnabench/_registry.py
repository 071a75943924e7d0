"""The registry every extension point uses: names and prefixes → lazy loaders, extensible through entry points.

Entries are lazy ``"module:attr"`` strings (nothing heavy is imported until used). Other packages
add their own under the entry-point groups ``fnabench.models``, ``fnabench.tasks`` and
``fnabench.variants``: the entry-point name is the registry key, its value the loader.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any

from fnabench._errors import UserError


class RegistryError(UserError, KeyError):
    """A name no registry entry matches; the message lists what is accepted."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """Maps exact names (``tiny:vit``) and prefixes (``timm`` for ``timm:NAME``) to loaders."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind, self.group = kind, group
        self._entries: dict[str, str | Callable[..., Any]] = {}
        self._help: dict[str, str] = {}
        self._plugins_loaded = False

    def register(self, key: str, target: str | Callable[..., Any], help: str = "") -> None:
        """Register ``key`` (an exact name, or a prefix before ':') → a callable or 'module:attr'."""
        self._entries[key] = target
        self._help[key] = help

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.group):
            self._entries.setdefault(ep.name, ep.value)
            self._help.setdefault(ep.name, f"from {ep.value}")

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """(key, help) pairs for ``fnabench list``."""
        return [(k, self._help.get(k, "")) for k in self.names()]

    def resolve(self, name: str) -> tuple[Callable[..., Any], str]:
        """The loader for ``name`` and the argument it gets (the part after the prefix, or the name)."""
        self._load_plugins()
        if name in self._entries:
            key, arg = name, name.partition(":")[2] or name
        else:
            key, _, arg = name.partition(":")
            if key not in self._entries or not arg:
                raise RegistryError(
                    f"unknown {self.kind} {name!r}; accepted: {', '.join(self._accepted())}"
                )
        target = self._entries[key]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[key] = target
        return target, arg

    def _accepted(self) -> list[str]:
        return [k if ":" in k else f"{k}:<name>" for k in self.names()]
