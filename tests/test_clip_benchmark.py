"""CLIP_benchmark both ways round, offline: a tiny random open_clip CLIP on the generated shapes set.

Its CLI with ``--model_type fnabench`` and fnabench's ``clip_benchmark:<dataset>`` task read the same
files through CLIP_benchmark's builder and score with its metric functions, so they must agree exactly.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("clip_benchmark.cli")  # also needs its undeclared `requests` and pycocoevalcap

from fnabench import parse_variant, patch
from fnabench.cli.clip_benchmark_cmd import main
from fnabench.data.generated import retrieval as shapes
from fnabench.models.open_clip import load_tiny
from fnabench.tasks.base import Settings, TaskError
from fnabench.tasks.clip_benchmark_task import make_task

FNA = "fna:m=16,layers=-2:"  # the tiny model has 4 blocks and 8×8 + 1 = 65 tokens at 64 px
BATCH = 8
SETTINGS = Settings(batch_size=BATCH)
CLI = ["eval", "--model_type", "fnabench", "--model", "tiny:open_clip", "--no_amp", "--num_workers", "0",
       "--batch_size", str(BATCH), "--quiet"]


def canonical(spec: str) -> str:
    return parse_variant(spec).canonical


def task_metrics(loaded, task, prepared, spec: str | None) -> dict[str, float]:
    """fnabench's path: the variant patched into the model, then the task's evaluate."""
    if spec is None:
        return task.evaluate(loaded, prepared, SETTINGS)
    with patch(loaded.model, spec):
        return task.evaluate(loaded, prepared, SETTINGS)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return shapes.ensure(tmp_path_factory.mktemp("data") / "shapes", num_images=20)


@pytest.fixture(scope="module")
def cli_results(shapes_root, tmp_path_factory):
    """CLIP_benchmark's CLI path: one JSON per variant, keyed by the canonical variant it records."""
    out = tmp_path_factory.mktemp("cli")
    argv = [*CLI, "--variant", "exact", FNA, "--dataset", "mscoco_captions", "--dataset_root", str(shapes_root),
            "--recall_k", "1", "5", "10", "--output", str(out / "{dataset}_{model}_{variant}.json")]
    assert main(argv) == 0
    files = sorted(out.glob("*.json"))
    assert len(files) == 2
    return files, {d["variant"]: d for d in (json.loads(f.read_text()) for f in files)}


@pytest.fixture
def loaded():
    return load_tiny()


@pytest.fixture
def retrieval(shapes_root, loaded):
    task = make_task("mscoco_captions", dataset_root=str(shapes_root))
    return task, task.prepare(loaded, SETTINGS)


def test_cli_json_and_task_agree_exactly(cli_results, loaded, retrieval):
    _, by_variant = cli_results
    task, prepared = retrieval
    assert set(by_variant) == {canonical("exact"), canonical(FNA)}
    for spec in ("exact", FNA):
        result = by_variant[canonical(spec)]
        assert (result["dataset"], result["model"], result["task"]) == ("mscoco_captions", "tiny:open_clip",
                                                                         "zeroshot_retrieval")
        assert result["model_type"] == "fnabench" and result["variant_short"] == parse_variant(spec).short
        ours = task_metrics(loaded, task, prepared, spec)
        assert set(ours) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
        assert ours == result["metrics"], spec
    assert task.primary == "image_retrieval_recall@1"


def test_clip_benchmark_build_makes_csv_with_the_variant(cli_results, tmp_path, monkeypatch):
    files, _ = cli_results
    out = tmp_path / "benchmark.csv"
    cli = pytest.importorskip("clip_benchmark.cli")
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "build", *map(str, files), "--output", str(out)])
    cli.main()  # CLIP_benchmark's own entry point, untouched
    rows = list(csv.DictReader(out.open()))
    assert {r["variant"] for r in rows} == {canonical("exact"), canonical(FNA)}
    assert all(r["model_fullname"] == "tiny:open_clip -" and r["image_retrieval_recall@1"] for r in rows)


def test_patched_exact_equals_unpatched_and_fna_is_live(loaded, retrieval):
    task, prepared = retrieval
    assert task_metrics(loaded, task, prepared, None) == task_metrics(loaded, task, prepared, "exact")
    images = task.example_batch(prepared, SETTINGS)
    with torch.no_grad():
        exact = loaded.embed(images)
        with patch(loaded.model, FNA):
            fna = loaded.embed(images)
    assert not torch.allclose(exact, fna)


def test_text_side_encoded_once_and_again_only_for_text_variants(shapes_root, loaded):
    calls = []
    encode_text = loaded.extra["encode_text"]
    loaded.extra["encode_text"] = lambda tokens: calls.append(len(tokens)) or encode_text(tokens)
    task = make_task("mscoco_captions", dataset_root=str(shapes_root))
    prepared = task.prepare(loaded, SETTINGS)
    assert sum(calls) == 100 and len(calls) == 3  # 20 images × 5 captions, in CLIP_benchmark's 3 batches
    first = task_metrics(loaded, task, prepared, "exact")
    task_metrics(loaded, task, prepared, FNA)
    assert len(calls) == 3
    # a variant on the text tower re-encodes the captions under that variant
    assert task_metrics(loaded, task, prepared, "mask:tokens=all,tower=text") == first
    assert len(calls) == 6


def _shape_folder(root):
    """An ImageFolder of shapes (one class per shape) plus CLIP_benchmark custom class-name/template files."""
    picked = [s for shape in shapes.SHAPES for s in [x for x in shapes.samples(60, seed=1) if x.shape == shape][:2]]
    for i, sample in enumerate(picked):  # 2 images of each of the 6 shapes
        folder = root / "val" / sample.shape
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"{i:04d}.png")
    key = "imagenet1k-unverified"  # CLIP_benchmark's name for a plain ImageFolder tree (ROOT/val/<class>/)
    names, templates = root / "classnames.json", root / "templates.json"
    names.write_text(json.dumps({key: sorted(p.name for p in (root / "val").iterdir())}))
    templates.write_text(json.dumps({key: ["a photo of a {c}.", "a {c} shape.", "a drawing of a {c}."]}))
    return key, names, templates


def test_zero_shot_classification_both_ways(tmp_path, loaded):
    dataset, names, templates = _shape_folder(tmp_path / "folder")
    out = tmp_path / "out"
    out.mkdir()
    files = ["--custom_classname_file", str(names), "--custom_template_file", str(templates)]
    assert main([*CLI, "--variant", FNA, "--dataset", dataset, "--dataset_root", str(tmp_path / "folder"), *files,
                 "--output", str(out / "cls_{variant}.json")]) == 0
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    task = make_task(dataset, dataset_root=str(tmp_path / "folder"), custom_classname_file=str(names),
                     custom_template_file=str(templates))
    assert task.task == "zeroshot_classification" and task.primary == "acc1"
    ours = task_metrics(loaded, task, task.prepare(loaded, SETTINGS), FNA)
    assert set(ours) == {"acc1", "acc5", "mean_per_class_recall"}
    assert ours == result["metrics"] and result["variant"] == canonical(FNA)


def test_half_precision_model_scores_in_float32(tmp_path):
    dataset, names, templates = _shape_folder(tmp_path / "folder")
    loaded = load_tiny().to("cpu", torch.bfloat16)  # as the runner casts it for dtype = "bfloat16"
    settings = Settings(batch_size=BATCH, dtype=torch.bfloat16)
    task = make_task(dataset, dataset_root=str(tmp_path / "folder"), custom_classname_file=str(names),
                     custom_template_file=str(templates))
    prepared = task.prepare(loaded, settings)
    assert prepared.text.embeddings.dtype == torch.float32
    with patch(loaded.model, FNA):
        metrics = task.evaluate(loaded, prepared, settings)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}


@pytest.mark.slow
def test_runner_record_equals_clip_benchmark_json(cli_results, shapes_root, tmp_path):
    from fnabench.harness.config import from_dict
    from fnabench.harness.records import read_records
    from fnabench.harness.runner import Runner

    name = "clip_benchmark:mscoco_captions"
    config = from_dict({"name": "cb", "models": ["tiny:open_clip"], "tasks": [name], "variants": [FNA],
                        "batch_size": BATCH, "timing_repeats": 1, "out": str(tmp_path / "results"),
                        "task_options": {name: {"dataset_root": str(shapes_root)}}})
    summary = Runner(config, quiet=True).run()
    assert summary.ok, summary.failed
    _, by_variant = cli_results
    (record,) = read_records(tmp_path / "results")
    assert record["variant"] == canonical(FNA) and record["flops"]["gflops"] > 0
    assert record["metrics"] == by_variant[canonical(FNA)]["metrics"]
    assert record["primary_metric"] == "image_retrieval_recall@1"


def test_shapes_set_is_seeded_and_read_by_clip_benchmarks_builder(shapes_root):
    a, b = shapes.samples(6, seed=3), shapes.samples(6, seed=3)
    assert [s.captions for s in a] == [s.captions for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    assert all(len(s.captions) == 5 and s.colour in s.captions[0] and s.shape in s.captions[0] for s in a)
    assert len({(s.shape, s.colour, s.position, s.size, s.background) for s in shapes.samples(200)}) == 200
    stamp = (shapes_root / shapes.MARKER).stat().st_mtime_ns
    assert shapes.ensure(shapes_root, num_images=20) == shapes_root  # cached: not rewritten
    assert (shapes_root / shapes.MARKER).stat().st_mtime_ns == stamp
    from fnabench.adapters.clip_benchmark import build_dataset, captions_of

    ds = build_dataset("mscoco_captions", str(shapes_root), None, task="zeroshot_retrieval")
    assert len(ds) == 20 and all(len(captions_of(ds, i)) == 5 for i in range(len(ds)))
    assert captions_of(ds, 3) == ds[3][1]


@pytest.mark.parametrize(("dataset", "options", "words"), [
    ("no_such_set", {}, "unknown CLIP_benchmark dataset 'no_such_set'; accepted:"),
    ("mscoco_captions", {"dataset_root": "/nonexistent/coco"}, "not found under '/nonexistent/coco'"),
    ("cifar10", {"dataset_root": "/nonexistent/cifar"}, "Dataset not found"),
])
def test_unavailable_datasets_are_one_line_task_errors(dataset, options, words, loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("FNABENCH_CACHE", str(tmp_path))  # where clip_benchmark:shapes would generate
    task = make_task(dataset, **options)
    with pytest.raises(TaskError, match=r"^clip_benchmark: ") as err:
        task.prepare(loaded, SETTINGS)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists("/nonexistent") and not any(tmp_path.iterdir())  # nothing fetched or created


@pytest.mark.parametrize(("dataset", "options", "words"), [
    ("mscoco_captions", {"bogus": 1}, "clip_benchmark:mscoco_captions: unknown option(s) 'bogus'; accepted: amp,"),
    ("shapes", {"num_images": 0}, "option num_images = 0 is not accepted; accepted: an integer >= 1"),
    ("winoground", {}, "task 'image_caption_selection' is not supported; accepted:"),
    ("wds/imagenet1k", {}, "webdataset sets are not supported"),
    ("mscoco_captions", {"recall_k": [0]}, "recall_k = [0] is not accepted; accepted: an integer >= 1 or a list"),
])
def test_bad_task_options_are_one_line_task_errors(dataset, options, words):
    with pytest.raises(TaskError) as err:
        make_task(dataset, **options)
    assert words in str(err.value)


def test_cli_user_errors(shapes_root, capsys):
    data = ["--dataset", "mscoco_captions", "--dataset_root", str(shapes_root)]
    with pytest.raises(SystemExit) as exit_:
        main([*CLI, "--variant", "fna:q=3", *data])
    assert exit_.value.code == 2 and "unknown key 'q' for 'fna'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model_type", "open_clip", "--variant", FNA, *data])
    assert "--variant/--image_size need --model_type fnabench" in capsys.readouterr().err
    assert main([*CLI[:4], "tiny:vit", *CLI[5:], *data]) == 2
    assert "no text side for CLIP_benchmark" in capsys.readouterr().err
