"""`fnabench analyze`: files, records through the harness, a folder rebuilt byte for byte from its records,
one-line errors; and the committed leaderboards/analysis-offline regenerates from its records."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fnabench.cli.main import main
from fnabench.harness.records import read_records

ROOT = Path(__file__).resolve().parents[1]
BOARD = ROOT / "leaderboards" / "analysis-offline"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    pytest.importorskip("timm")
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("analyze")
    args = ["analyze", "tiny:vit", "--size", "32", "--limit", "2", "--ablate", "artifact", "first",
            "--publish", str(root / "board"), "--results", str(root / "results"), "--out", str(root / "full"),
            "--quiet", "--threads", "1"]
    assert main(args) == 0
    return root


def test_analyze_writes_full_outputs_records_and_a_published_folder(board):
    full = board / "full" / "tiny-vit-32px"
    assert {"summary.json", "layers.csv", "heads.csv", "tokens.csv", "token_norms.csv", "arrays.npz",
            "norms_by_layer.png", "token_norms.png", "sink_share.png", "ablation-first-keys.json",
            "ablation-artifact-keys.csv"} <= {p.name for p in full.iterdir()}
    published = board / "board" / "tiny-vit-32px"
    names = {p.name for p in published.iterdir()}
    assert "sink_share.png" in names and "token_norms.csv" not in names and "arrays.npz" not in names
    records = read_records(board / "results")
    assert len(records) == 3 and {r["task"] for r in records} == {"analysis:packaged"}
    variants = {r["variant_short"] for r in records}
    assert variants == {"exact", "mask:tokens=first", "mask"}  # (tokens=artifact is the mask's default)
    exact = next(r for r in records if r["variant_short"] == "exact")
    first = next(r for r in records if r["variant_short"] == "mask:tokens=first")
    assert next(r for r in records if r["variant_short"] == "mask")["metrics"]["masked_tokens"] == 0
    assert exact["metrics"]["cos_sim"] == 1 and first["metrics"]["masked_tokens"] == 1
    assert first["flops"]["total"] > 0 and first["items"] == {"inputs": 2, "tokens": 5}
    readme = (board / "board" / "README.md").read_text()
    assert "### analysis:packaged — primary metric: cos_sim" in readme
    assert "- command: `fnabench analyze tiny:vit --size 32 --limit 2 --ablate artifact first --publish" in readme
    tables = (board / "board" / "analysis.md").read_text()
    assert "## tiny:vit at 32 px — analysis:packaged" in tables and "### Ablation: the first token removed" in tables
    assert "[sink_share.png](tiny-vit-32px/sink_share.png)" in tables


def test_the_published_folder_rebuilds_byte_for_byte_from_its_records(board, tmp_path):
    copy = tmp_path / "board"
    shutil.copytree(board / "board", copy)
    committed = _files(copy)
    (copy / "README.md").unlink()
    (copy / "analysis.md").unlink()
    assert main(["analyze", "--from-records", str(copy / "records"), "--publish", str(copy)]) == 0
    assert _files(copy) == committed


@pytest.mark.parametrize("args, message", [
    (["analyze"], "give at least one model"),
    (["analyze", "nosuch:model"], "unknown model"),
    (["analyze", "tiny:vit", "--images", "/no/such/folder"], "no such file or folder"),
    (["analyze", "tiny:vit", "--artifact-ratio", "50"], "artifact ratio"),
    (["analyze", "tiny:vit", "--ablate", "massive", "--layers", "x"], "layers"),
    (["analyze", "tiny:vit", "--device", "tpu"], "unknown device"),
    (["analyze", "--from-records", "results/x"], "give both"),
])
def test_bad_requests_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_config_file_keys_are_checked(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('models = ["tiny:vit"]\nablate = "massive"\n')
    assert main(["analyze", "--config", str(bad)]) == 2
    assert "ablate = 'massive' should be a list" in capsys.readouterr().err
    bad.write_text('models = ["tiny:vit"]\nsink = 0.3\n')
    assert main(["analyze", "--config", str(bad)]) == 2
    assert "unknown key(s) sink" in capsys.readouterr().err


def test_the_gpu_configs_are_valid_here():
    """configs/analysis/gpu.toml parses and every model and ablation spec in it is accepted (device aside); the
    GPU sweeps carry parseable masking variants, keys and values."""
    import argparse

    from fnabench import parse_variant
    from fnabench.cli import analyze_cmd as analyze_cli
    from fnabench.harness.config import tomllib

    args = argparse.Namespace(config=str(ROOT / "configs" / "analysis" / "gpu.toml"), models=[], device="cpu")
    options = analyze_cli._options(args)
    assert options["models"][0] == "open_clip:ViT-L-14@openai" and options["action"] == ["keys", "values"]
    options["publish"] = None
    analyze_cli._check_first(options)
    for name in ("clip_coco_retrieval", "clip_imagenet_zeroshot", "dinov2_large_knn"):
        config = tomllib.loads((ROOT / "configs" / "sweeps" / f"{name}.toml").read_text())
        masks = [parse_variant(v) for v in config["variants"] if "mask:" in v]  # (the sweeps need CUDA and data)
        assert len(masks) >= 6 and {m.mask["action"] for m in masks} == {"keys", "values"}


def test_committed_analysis_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/analysis-offline: README.md and analysis.md come back byte for byte from its records (and its
    config and description), through the rebuild command its description names; the figures stay."""
    if not BOARD.is_dir():
        pytest.skip("leaderboards/analysis-offline not generated")
    copy = tmp_path / "leaderboards" / "analysis-offline"
    shutil.copytree(BOARD, copy)
    committed = _files(copy)
    (copy / "README.md").unlink()
    (copy / "analysis.md").unlink()
    monkeypatch.chdir(tmp_path)
    command = ("fnabench analyze --from-records leaderboards/analysis-offline/records "
               "--publish leaderboards/analysis-offline")
    assert command in committed["description.md"].decode()
    assert main(command.split()[1:]) == 0
    assert _files(copy) == committed
    records = read_records(copy / "records")
    models = {r["model"] for r in records}
    assert models == {"offline:dinov2-s", "recall:cpu@seed0"}
    # what description.md says of them, held to the records
    exact = [r for r in records if r["variant_short"] == "exact"]
    assert len(exact) == 3 and all(r["metrics"]["artifact_tokens"] == 0 and r["metrics"]["massive_tokens"] == 0
                                   and r["analysis"]["verdict"][0].startswith("No outlier tokens") for r in exact)
    ablations = {(r["model"], r["settings"]["image_size"], r["analysis"]["ablation"]["kind"],
                  r["analysis"]["ablation"]["action"]): r["metrics"] for r in records if r["variant_short"] != "exact"}
    assert len(ablations) == 18
    for (_, _, kind, _), m in ablations.items():
        if kind == "massive":  # none to remove anywhere: nothing changes
            assert m["masked_tokens"] == 0 and m["cos_sim"] == pytest.approx(1, abs=1e-9)
    for size in (224, 448):  # DINOv2: CLS removed as a key costs more than its values zeroed; its sinks spread
        keys, values = (ablations[("offline:dinov2-s", size, "first", a)] for a in ("keys", "values"))
        assert keys["cos_sim"] < values["cos_sim"] < 0.99 and keys["takeover_percent"] < 2
    keys, values = (ablations[("recall:cpu@seed0", None, "first", a)] for a in ("keys", "values"))
    assert values["cos_sim"] < keys["cos_sim"] < 0.99 and keys["takeover_percent"] == 0  # the GPT-2: the reverse
