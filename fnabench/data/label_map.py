"""Which logit a dataset's class is: folder or WebDataset label names → a model head's indices.

A class is named by what the head calls it (WordNet ids such as ``n01440764`` for ImageNet heads, or
the class names a checkpoint carries) or by its index (``0`` … ``C-1``, ImageNetV2's folder layout).
ImageNet-ReaL's ``real.json`` (one list of ImageNet-1k indices per validation image, in the order of
the ``ILSVRC2012_val_NNNNNNNN`` file numbers) gives each image its set of correct classes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from fnabench._errors import TaskError
from fnabench._extras import require

WNID = re.compile(r"n\d{8}")
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")


def imagenet_1k_wnids() -> list[str]:
    """ImageNet-1k's 1000 WordNet ids in the standard class-index order (timm ships the list)."""
    return list(require("timm.data").ImageNetInfo("imagenet-1k").label_names())


class ClassMap:
    """Resolves dataset class names to a head's indices; refuses a name the head does not have."""

    def __init__(self, labels: Sequence[str | None] | None, num_classes: int, model: str) -> None:
        self.labels, self.num_classes, self.model = labels, num_classes, model
        self._index = {name: i for i, name in enumerate(labels or []) if name is not None}

    def _one(self, name: str) -> int | None:
        if name in self._index:
            return self._index[name]
        if name.isdigit() and int(name) < self.num_classes:  # ImageNetV2: folders 0..999 are class indices
            return int(name)
        return None

    def resolve(self, names: Iterable[str], where: str) -> dict[str, int]:
        """``{name: head index}`` for every name, or one line naming those that match no class."""
        names = sorted(set(names))
        found = {n: self._one(n) for n in names}
        unknown = [n for n, i in found.items() if i is None]
        if unknown:
            shown = ", ".join(map(repr, unknown[:3])) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            known = [n for n in (self.labels or []) if n is not None]
            words = ("WordNet ids (e.g. n01440764)" if known and WNID.fullmatch(known[0])
                     else f"class names ({', '.join(known[:4])}{', ...' if len(known) > 4 else ''})" if known
                     else "nothing by name (its checkpoint names no classes)")
            raise TaskError(f"{where}: class(es) {shown} match no class of {self.model}'s {self.num_classes}-way head; "
                            f"accepted: {words}, or class indices 0..{self.num_classes - 1}")
        return {n: int(i) for n, i in found.items()}

    def imagenet_1k(self) -> list[int]:
        """Head index of each ImageNet-1k class (for ReaL labels), through WordNet ids where the head has them."""
        if self._index and all(WNID.fullmatch(n) for n in self._index):
            wnids = imagenet_1k_wnids()
            missing = [w for w in wnids if w not in self._index]
            if missing:
                raise TaskError(f"ImageNet-ReaL labels need an ImageNet-1k head; {self.model} lacks "
                                f"{len(missing)} of its classes (e.g. {missing[0]})")
            return [self._index[w] for w in wnids]
        if self.labels is None and self.num_classes == 1000:
            return list(range(1000))
        raise TaskError(f"ImageNet-ReaL labels need an ImageNet-1k head; {self.model}'s head names "
                        f"{self.num_classes} classes that are not WordNet ids")


def read_real_labels(path: str | Path) -> list[list[int]]:
    """ImageNet-ReaL's ``real.json``: per validation image (by file number), its ImageNet-1k classes."""
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise TaskError(f"cannot read ImageNet-ReaL labels {str(path)!r}: {err}") from None
    if not isinstance(labels, list) or not all(isinstance(x, list) for x in labels):
        raise TaskError(f"{str(path)!r} is not ImageNet-ReaL's real.json (a list of lists of class indices)")
    return labels


def val_number(name: str) -> int | None:
    """The 1-based number in an ``ILSVRC2012_val_NNNNNNNN`` file name, else ``None``."""
    match = VAL_NUMBER.search(name)
    return int(match.group(1)) if match else None
