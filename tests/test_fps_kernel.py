"""The compiled farthest-point sampling op picks exactly the landmarks the eager loop picks: guarantees, excluded
tokens, per-row masks, a row that runs out of candidates, m = 1 and m > N included; FNA's output is the same."""

from __future__ import annotations

import pytest
import torch

from fnabench.variants import fps_kernel
from fnabench.variants.landmarks import farthest_point_sampling

pytestmark = pytest.mark.skipif(not fps_kernel.available(),
                                reason="the compiled FPS op could not be built here (no C++20 compiler or ninja)")


def _both(monkeypatch, *args, **kwargs):
    compiled = farthest_point_sampling(*args, **kwargs)
    monkeypatch.setenv("FNABENCH_FPS", "eager")
    eager = farthest_point_sampling(*args, **kwargs)
    monkeypatch.delenv("FNABENCH_FPS")
    return compiled, eager


@pytest.mark.parametrize("n, d, m", [(17, 8, 4), (65, 64, 16), (257, 64, 64), (30, 16, 1), (12, 8, 12), (9, 4, 14)])
def test_the_op_picks_the_eager_landmarks(monkeypatch, n, d, m):
    for seed in range(3):
        x = torch.randn(3, n, d, generator=torch.Generator().manual_seed(seed))
        x[:, 0] *= 6  # a high-norm token, as sinks are
        compiled, eager = _both(monkeypatch, x, m)
        assert torch.equal(compiled, eager), (seed, compiled, eager)


def test_guaranteed_and_excluded_tokens_shared_or_per_row(monkeypatch):
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(5))
    guarantee = torch.zeros(40, dtype=torch.bool)
    guarantee[:2] = True
    exclude = torch.zeros(40, dtype=torch.bool)
    exclude[30:] = True
    compiled, eager = _both(monkeypatch, x, 12, guarantee=guarantee, exclude=exclude)
    assert torch.equal(compiled, eager) and (compiled[:, :2] == torch.tensor([0, 1])).all()
    assert not ((compiled >= 30).any())
    rows = torch.zeros(2, 40, dtype=torch.bool)
    rows[0, 5:35] = True  # row 0 has 8 candidates left for 12 picks: it runs out and repeats its last
    compiled, eager = _both(monkeypatch, x, 12, guarantee=guarantee, exclude=rows)
    assert torch.equal(compiled, eager) and compiled[0, -1] == compiled[0, -2]


def test_fna_with_fps_landmarks_is_unchanged(monkeypatch):
    from fnabench.variants import parse_variant
    from fnabench.variants.variant import ForwardState

    q, k, v = (torch.randn(2, 4, 65, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    variant = parse_variant("fna:m=16,landmarks=fps")
    compiled = variant.attend(q, k, v, ForwardState(tower="image", num_layers=1, num_prefix=1))
    monkeypatch.setenv("FNABENCH_FPS", "eager")
    eager = variant.attend(q, k, v, ForwardState(tower="image", num_layers=1, num_prefix=1))
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("spec", ["fna:m=16,landmarks=fps", "fna:m=16,landmarks=fps,guarantee=none",
                                  "fna:m=40,landmarks=fps,exclude=1:20", "fna:m=8,landmarks=norm"])
def test_counted_flops_are_the_eager_loops(monkeypatch, spec):
    timm = pytest.importorskip("timm")
    import fnabench
    from fnabench.measure import count_flops

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=2,
                              num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with fnabench.patch(model, spec):
        compiled = count_flops(model, x)
        monkeypatch.setenv("FNABENCH_FPS", "eager")
        eager = count_flops(model, x)
    assert compiled.by_op.get("fps", 0) > 0 and (compiled.total, compiled.attention) == (eager.total, eager.attention)
