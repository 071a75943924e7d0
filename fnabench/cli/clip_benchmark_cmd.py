"""``fnabench-clip-benchmark``: CLIP_benchmark's own CLI with one more model type, ``fnabench``.

``fnabench-clip-benchmark eval --model_type fnabench --model ViT-B-16 --pretrained laion2b_s34b_b88k
--variant "fna:m=64,layers=-6:" --dataset mscoco_captions ...`` writes CLIP_benchmark's usual JSON
(with the variant in it); ``--model`` also takes fnabench model names such as ``tiny:open_clip``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fnabench.adapters import clip_benchmark


def main(argv: Sequence[str] | None = None) -> int:
    """Run CLIP_benchmark's CLI with fnabench's model type and model names available."""
    return clip_benchmark.main(argv)


if __name__ == "__main__":
    sys.exit(main())
