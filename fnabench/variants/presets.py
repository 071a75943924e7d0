"""Named variant presets: a short name for a full spec (paper settings), usable in sweep configs and on the CLI.
Other packages add presets under the ``fnabench.variants`` entry-point group."""

from __future__ import annotations

from fnabench._registry import Registry

VARIANTS = Registry("variant preset", "fnabench.variants")

VARIANTS.register("paper-clip-l14-m64", lambda: "fna:m=64,layers=-11:,pinv=newton",
                  "FNA as released for CLIP ViT-L/14: m=64 on the last 11 of 24 blocks, Newton-Schulz inverse")
VARIANTS.register("paper-clip-l14-m32", lambda: "fna:m=32,layers=-11:,pinv=newton",
                  "FNA m=32 on the last 11 of 24 blocks, the official Newton-Schulz inverse")


def expand_variant(spec: str) -> str:
    """A preset name → its spec string; any other string is returned unchanged."""
    if ":" not in spec and "+" not in spec and spec in VARIANTS.names():
        factory, _ = VARIANTS.resolve(spec)
        return factory()
    return spec
