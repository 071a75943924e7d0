"""Writing files so that nothing written is ever seen half-done, and TOML values: one way each, for every layer.

Standard library only (the bottom layer): a writer that needs torch passes its own ``write`` callable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """fnabench's cache folder: ``$FNABENCH_CACHE``, else ``$XDG_CACHE_HOME/fnabench``, else ``~/.cache/fnabench``
    (an empty variable counts as unset)."""
    if os.environ.get("FNABENCH_CACHE"):
        return Path(os.environ["FNABENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fnabench"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Make ``path`` by ``write(tmp)`` on a temporary sibling, then one rename: a reader sees the old file or the
    whole new one, and a crash leaves no partial file. The file gets the mode a plain ``open()`` would give it
    (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, newline: str | None = None) -> Path:
    """:func:`write_atomic` of ``text`` exactly as given (flushed to disk before the rename)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline=newline) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)


def toml_value(value: Any) -> str:
    """One TOML value: booleans, numbers, strings (``\\``, ``"`` and newlines escaped), lists and tuples of
    them; anything else is written as its ``str`` in quotes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = value if isinstance(value, str) else str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
