"""The offline segmentation set: seeded (identical bytes on every generation), mmseg's folder layout, labels
in range, several materials per image, and a folder that is not a generated set is never overwritten."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="textures come from scikit-image's sample images (extra data)")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fnabench.data.generated import segmentation as seg_synthetic
from fnabench.tasks.base import TaskError


def test_the_set_is_seeded_in_mmsegs_layout_with_labels_by_construction(tmp_path):
    a = seg_synthetic.ensure(tmp_path / "a", num_train=3, num_test=4, size=64, seed=3)
    b = seg_synthetic.write(tmp_path / "b", num_train=3, num_test=4, size=64, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * (3 + 4) and (a / "img_dir/test/00003.png").is_file()
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    labels = [np.asarray(Image.open(p)) for p in sorted((a / "ann_dir").rglob("*.png"))]
    assert all(lab.shape == (64, 64) and lab.max() < len(seg_synthetic.CLASSES) for lab in labels)
    assert np.mean([len(np.unique(lab)) for lab in labels]) >= 3  # a background and several materials
    assert len(seg_synthetic.CLASSES) == 8 and len(seg_synthetic.PALETTE) == 8
    assert seg_synthetic.ensure(tmp_path / "a", num_train=3, num_test=4, size=64, seed=3) == a  # reused
    other = seg_synthetic.ensure(tmp_path / "a", num_train=3, num_test=4, size=64, seed=4)  # parameters changed
    assert (other / "img_dir/test/00000.png").read_bytes() != (b / "img_dir/test/00000.png").read_bytes()


def test_a_folder_that_is_not_a_generated_set_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not a dataset")
    with pytest.raises(TaskError, match="not a generated set"):
        seg_synthetic.ensure(tmp_path / "mine", num_train=1, num_test=1, size=32)
    assert (tmp_path / "mine" / "keep.txt").is_file()
