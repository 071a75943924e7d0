"""Getting variants into host models and out again: one module per host library.

Host libraries are imported only inside their adapter, and an adapter is consulted only when its
host library is already imported (a model of that library cannot exist otherwise).
"""

from fnabench.patching.core import AlreadyPatchedError, PatchHandle, UnsupportedModelError, patch

__all__ = ["AlreadyPatchedError", "PatchHandle", "UnsupportedModelError", "patch"]
