"""Local WebDataset shards read with the standard library: samples are tar members grouped by key.

WebDataset's convention: a member ``dir/KEY.EXT`` belongs to sample ``dir/KEY`` (the key ends at the
first dot of the file name) and ``EXT`` says what it holds (``jpg``, ``cls``, ``json``, ...). Shards are
indexed once (member offsets), so an image is read by one seek, in any order and in any worker,
without the ``webdataset`` package. A shard pattern takes WebDataset's braces (``{000..146}``,
``{a,b}``) and shell globs; local, uncompressed tar files only.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fnabench._errors import TaskError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` → a-00.tar, a-01.tar, a-02.tar (zero padding kept); ``{x,y}`` → both; left to right."""
    for match in _BRACES.finditer(pattern):
        body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
        span = _RANGE.fullmatch(body)
        if span:
            lo, hi = span.groups()
            width = len(lo) if lo.startswith("0") else 0
            choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
        elif "," in body:
            choices = body.split(",")
        else:
            continue  # a literal brace pair
        return [out for choice in choices for out in expand_braces(head + choice + tail)]
    return [pattern]


def shard_paths(pattern: str) -> list[Path]:
    """The existing files a shard pattern names, in pattern order (globs sorted), each once."""
    out: list[Path] = []
    for part in expand_braces(str(Path(pattern).expanduser())):
        for name in (sorted(glob.glob(part)) if glob.has_magic(part) else [part]):
            path = Path(name)
            if path.is_file() and path not in out:
                out.append(path)
    return out


@dataclass(frozen=True)
class TarImage:
    """An image inside a tar shard, read by offset (picklable, so data-loader workers can read it)."""

    shard: str
    offset: int
    size: int

    def open(self) -> Image.Image:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")


def _label_text(raw: bytes, ext: str, where: str) -> str:
    text = raw.decode("utf-8").strip()
    if ext.endswith("json"):
        try:
            value = json.loads(text)
        except ValueError:
            raise TaskError(f"{where}: label member is not JSON") from None
        value = next((value[k] for k in ("label", "cls", "class") if isinstance(value, dict) and k in value), value)
        text = str(value).strip()
    return text


def _open_shard(shard: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(shard, "r:")  # uncompressed only: members must be readable by offset
    except tarfile.ReadError as err:
        raise TaskError(f"{shard}: not an uncompressed tar shard ({err}); accepted: plain .tar WebDataset "
                        "shards") from None


def read_samples(shards: list[Path], label_key: str = "cls") -> list[tuple[TarImage, str, str]]:
    """(image, label text, key) of every sample that has an image and a ``label_key`` member, shard order."""
    out = []
    for shard in shards:
        with _open_shard(shard) as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot or stem.startswith("_"):  # WebDataset skips metadata members such as __index__
                    continue
                groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = member
            for key, parts in groups.items():
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if image is None or label_key not in parts:
                    continue
                raw = tar.extractfile(parts[label_key]).read()
                label = _label_text(raw, label_key, f"{shard}:{key}.{label_key}")
                out.append((TarImage(str(shard), image.offset_data, image.size), label, key))
    return out
