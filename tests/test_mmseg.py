"""mmsegmentation 1.x: the one-line hook in a stock config, mmcv's attention and mmseg's backbones patched
with undo, FnabenchBackbone, the ``mmseg:<config>`` task in the harness (its mIoU equals mmseg's own log),
and the trained offline head. Skipped where the ``seg`` extra (mmseg with a compiled mmcv) is absent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmseg.models", reason="needs the seg extra (mmseg, and mmcv from tools/install_mmcv.sh)")

from mmengine.config import Config
from mmengine.runner import Runner

import fnabench
from fnabench._errors import UserError
from fnabench.adapters import mmseg as adapter
from fnabench.models.mmseg import _build_segmentor, _config, resolve_config
from fnabench.tasks.mmseg_task import _slug
from fnabench.variants import SpecError

STOCK = "vit/vit_deit-s16_upernet_8xb2-80k_ade20k-512x512"


def _build(**cfg) -> torch.nn.Module:
    """An mmseg model from a config dict, built in mmseg's scope."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(cfg)


def _ade_folder(root: Path, count: int = 3) -> Path:
    """A few images in ADE20K's layout (random pictures and labels 0..150)."""
    rng = np.random.default_rng(0)
    for sub in ("images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    for i in range(count):
        picture = (rng.random((128, 128, 3)) * 255).astype(np.uint8)
        Image.fromarray(picture).save(root / "images/validation" / f"ADE_val_{i:08d}.jpg")
        labels = rng.integers(0, 151, (128, 128)).astype(np.uint8)
        Image.fromarray(labels).save(root / "annotations/validation" / f"ADE_val_{i:08d}.png")
    return root


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """mmseg's own DeiT-S + UPerNet ADE20K config, as shipped, with random weights saved as a checkpoint."""
    tmp = tmp_path_factory.mktemp("stock")
    cfg = Config.fromfile(str(resolve_config(STOCK)))
    torch.manual_seed(0)
    segmentor = _build_segmentor(_config(resolve_config(STOCK)))
    torch.save({"state_dict": segmentor.state_dict()}, tmp / "random.pth")
    return cfg, _ade_folder(tmp / "ade"), tmp


def _run_stock(stock, name: str, hook: dict | None) -> tuple[dict, dict[str, np.ndarray]]:
    """mmseg's test loop on the stock config; ``hook`` is the one added line. Returns metrics and predictions."""
    cfg, data_root, tmp = stock
    cfg = cfg.copy()
    cfg.work_dir = str(tmp / name)
    cfg.load_from = str(tmp / "random.pth")
    loader = cfg.test_dataloader
    loader.num_workers, loader.persistent_workers = 0, False
    loader.dataset.data_root = str(data_root)
    loader.dataset.pipeline[1] = dict(type="Resize", scale=(128, 128), keep_ratio=True)  # 64 patches, not 1024
    out = tmp / name / "pred"
    cfg.test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"], output_dir=str(out))
    if hook is not None:  # the whole change an mmseg user makes
        cfg.custom_imports = dict(imports=["fnabench.adapters.mmseg"], allow_failed_imports=False)
        cfg.custom_hooks = [hook]
    metrics = Runner.from_cfg(cfg).test()
    return metrics, {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}


@pytest.mark.slow
def test_a_stock_config_plus_one_hook_line_runs_any_variant_in_mmsegs_own_test_loop(stock):
    plain, plain_pred = _run_stock(stock, "plain", None)
    exact, exact_pred = _run_stock(stock, "exact", dict(type="FNAPatchHook", variant="exact"))
    every, every_pred = _run_stock(stock, "every", dict(type="FNAPatchHook", variant="fna:m=65"))
    _, fna_pred = _run_stock(stock, "fna", dict(type="FNAPatchHook", variant="fna:m=8,layers=-6:"))
    assert len(plain_pred) == 3 and set(plain_pred) == set(fna_pred)
    # exact through the hook: mmseg's own MultiheadAttention vs fnabench's SDPA, the same mIoU
    assert exact["mIoU"] == pytest.approx(plain["mIoU"], abs=0.011)
    same = np.mean([np.mean(exact_pred[k] == plain_pred[k]) for k in plain_pred])
    assert same > 0.999
    # FNA with every token (64 patches + CLS) a landmark: exact's predictions, pixel for pixel
    assert all(np.array_equal(every_pred[k], exact_pred[k]) for k in exact_pred) and every == exact
    # and the patch is live: 8 landmarks in the last 6 blocks change predictions
    assert np.mean([np.mean(fna_pred[k] != exact_pred[k]) for k in exact_pred]) > 0.01


def test_mmcv_attention_in_mmseg_vit_is_patched_with_undo_and_tome_keeps_intermediate_taps():
    torch.manual_seed(0)
    vit = _build(type="VisionTransformer", img_size=(64, 64), patch_size=16, embed_dims=96, num_layers=4,
                 num_heads=3, out_indices=(1, 3), final_norm=True)
    vit.eval()  # mmseg's ViT.train() returns None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = vit(x)
        with fnabench.patch(vit, "exact") as handle:
            out = vit(x)
            inner = handle.sites[0].module
            assert type(inner) is torch.nn.MultiheadAttention and not inner.batch_first  # sequence-first
            assert handle.sites[0].name == "layers.0.attn.attn" and handle.states["image"].num_prefix == 1
            exact = vit(x)
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(out, ref, strict=True))
        assert all("forward" not in m.__dict__ for m in vit.modules())
        with fnabench.patch(vit, "tome:r=0"):
            assert all(torch.equal(a, b) for a, b in zip(vit(x), exact, strict=True))
        with fnabench.patch(vit, "tome:r=4") as handle:
            merged = vit(x)
            assert handle.states["image"].flow.counts == [17, 13, 9, 5]
            flops = fnabench.count_flops(vit, x[:1]).total
        assert [t.shape for t in merged] == [t.shape for t in ref]  # taps of block 1 and 3 back on the 4x4 grid
        assert flops < fnabench.count_flops(vit, x[:1]).total
        assert all("forward" not in m.__dict__ for m in vit.modules())


def test_beit_attention_exact_with_its_position_bias_and_fna_refuses_in_one_line():
    torch.manual_seed(0)
    beit = _build(type="BEiT", img_size=(64, 64), patch_size=16, embed_dims=96, num_layers=2, num_heads=3,
                  out_indices=(1,), init_values=0.1)
    beit.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = beit(x)[0]
        with fnabench.patch(beit, "exact") as handle:
            assert type(handle.sites[0].module).__name__ == "BEiTAttention"
            assert (beit(x)[0] - ref).abs().max() < 1e-5
        with fnabench.patch(beit, "fna:m=4"), pytest.raises(ValueError, match="cannot honour an attention mask"):
            beit(x)
        with pytest.raises(fnabench.UnsupportedModelError, match=r"mmseg vit\.TransformerEncoderLayer"):
            fnabench.patch(beit, "tome:r=2")
        assert torch.equal(beit(x)[0], ref)


def test_fnabench_backbone_serves_patch_token_maps_and_keeps_checkpoints_head_only():
    backbone = adapter.FnabenchBackbone(model="tiny:dinov2", image_size=56, out_indices=[1, -1], cls_token=True)
    x = torch.randn(2, 3, 50, 56)  # padded to 56 x 56: 4 x 4 patches of 14 px
    maps = backbone(x)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 4, 4)] * 2 and backbone.out_channels == [192, 192]
    assert backbone.prefix == 5  # CLS + 4 registers are not patches
    assert backbone.state_dict() == {}  # frozen: the registry has the weights, checkpoints hold heads
    assert not any(p.requires_grad for p in backbone.parameters())
    with fnabench.patch(backbone.model, "tome:r=3"):
        merged = backbone(x)
    assert [m.shape for m in merged] == [m.shape for m in maps]
    with pytest.raises(UserError, match="out_indices"):
        adapter.FnabenchBackbone(model="tiny:dinov2", image_size=56, out_indices=[7])


def test_hook_refuses_a_bad_spec_when_the_config_is_built():
    with pytest.raises(SpecError, match="accepted"):
        adapter.FNAPatchHook(variant="fna:m=0")
    with pytest.raises(Exception, match="accepted: val, test"):
        adapter.FNAPatchHook(variant="exact", phases=("train",))


_TINY_CONFIG = """
custom_imports = dict(imports=['fnabench.adapters.mmseg'], allow_failed_imports=False)
default_scope = 'mmseg'
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255),
    backbone=dict(type='FnabenchBackbone', model='tiny:vit', out_indices=[-2, -1]),
    decode_head=dict(type='LinearBNHead', in_channels=[1, 1], in_index=[0, 1], input_transform='resize_concat',
                     channels=2, dropout_ratio=0.0, num_classes=8, norm_cfg=dict(type='BN'), align_corners=False),
    test_cfg=dict(mode='whole'))
pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
test_dataloader = dict(batch_size=1, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
                       dataset=dict(type='SyntheticTexturesDataset', split='test', num_train=1, num_test=3, size=64,
                                    seed=0, data_root={data_root!r}, pipeline=pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_cfg = dict(type='TestLoop')
default_hooks = dict(logger=dict(type='LoggerHook', interval=1))
log_level = 'INFO'
"""


def test_mmseg_task_in_the_harness_records_the_miou_mmseg_logs(tmp_path):
    from fnabench.harness import config as cfg_mod
    from fnabench.harness import records as rec_io
    from fnabench.harness.runner import run_sweep

    config = tmp_path / "tiny_seg.py"
    config.write_text(_TINY_CONFIG.format(data_root=str(tmp_path / "data")))
    task = f"mmseg:{config}"
    sweep = cfg_mod.from_dict({
        "name": "seg-tiny", "models": ["tiny:vit"], "image_sizes": [64], "tasks": [task],
        "variants": ["exact", "fna:m=8", "tome:r=6"], "batch_size": 2, "timing_repeats": 1,
        "out": str(tmp_path / "results"), "task_options": {task: {"work_dir": str(tmp_path / "work")}}})
    summary = run_sweep(sweep, quiet=True)
    assert summary.ok, summary.failed
    records = {r["variant_short"]: r for r in rec_io.read_records(tmp_path / "results")}
    assert set(records) == {"exact", "fna:m=8", "tome:r=6"}
    for short, record in records.items():
        logs = list((tmp_path / "work" / _slug(short)).glob("*/*.log"))
        assert len(logs) == 1, logs
        logged = dict(re.findall(r"(aAcc|mIoU|mAcc): ([0-9.]+)", logs[0].read_text()))
        assert {k: float(v) for k, v in logged.items()} == record["metrics"]
        assert record["items"] == {"test": 3} and record["flops"]["input_shape"] == [1, 3, 64, 64]
    flops = {k: r["flops"]["total"] for k, r in records.items()}
    assert flops["tome:r=6"] < flops["exact"]  # the whole segmentor, counted by fnabench
    assert json.dumps(records["exact"]["metrics"])  # plain floats


_STOCK_BACKBONE_CONFIG = _TINY_CONFIG.replace(
    "backbone=dict(type='FnabenchBackbone', model='tiny:vit', out_indices=[-2, -1]),",
    "backbone=dict(type='VisionTransformer', img_size=(64, 64), patch_size=16, embed_dims=96, num_layers=4, "
    "num_heads=3, out_indices=(1, 3)),").replace(
    "type='LinearBNHead', in_channels=[1, 1], in_index=[0, 1], input_transform='resize_concat',\n"
    "                     channels=2,", "type='FCNHead', in_channels=96, in_index=1, channels=32, num_convs=1,")


def test_an_mmseg_model_with_a_stock_backbone_runs_as_a_harness_cell(tmp_path):
    """Model ``mmseg:<config>``: the segmentor as the config builds it (mmseg's own ViT), weights from the
    task's checkpoint; the variant reaches mmcv's attention, ToMe's taps come back on the full grid."""
    from fnabench.harness import config as cfg_mod
    from fnabench.harness import records as rec_io
    from fnabench.harness.runner import run_sweep

    config = tmp_path / "stock_tiny.py"
    config.write_text(_STOCK_BACKBONE_CONFIG.format(data_root=str(tmp_path / "data")))
    assert "VisionTransformer" in config.read_text() and "FCNHead" in config.read_text()
    torch.manual_seed(0)
    segmentor = _build_segmentor(_config(config))
    torch.save({"state_dict": segmentor.state_dict()}, tmp_path / "weights.pth")
    task = f"mmseg:{config}"
    sweep = cfg_mod.from_dict({
        "name": "seg-stock", "models": [task], "tasks": [task], "variants": ["exact", "tome:r=4", "fna:m=8"],
        "batch_size": 1, "timing_repeats": 1, "out": str(tmp_path / "results"),
        "task_options": {task: {"work_dir": str(tmp_path / "work"), "checkpoint": str(tmp_path / "weights.pth")}}})
    summary = run_sweep(sweep, quiet=True)
    assert summary.ok, summary.failed
    records = {r["variant_short"]: r for r in rec_io.read_records(tmp_path / "results")}
    assert records["tome:r=4"]["flops"]["total"] < records["exact"]["flops"]["total"]
    assert records["fna:m=8"]["flops"]["attention"] != records["exact"]["flops"]["attention"]  # the patch is live
    assert all(0 <= r["metrics"]["mIoU"] <= 100 for r in records.values())


def test_unknown_config_is_one_line_naming_what_is_accepted():
    from fnabench.tasks.base import TaskError
    from fnabench.tasks.registry import make_task

    with pytest.raises(TaskError, match="synthetic-dinov2s-linear"):
        make_task("mmseg:no/such/config")
    with pytest.raises(TaskError, match="unknown option"):
        make_task("mmseg:synthetic-dinov2s-linear", {"chekpoint": "x"})


@pytest.mark.slow
def test_the_trained_offline_head_segments_far_above_chance(tmp_path):
    """The shipped head on the frozen offline:dinov2-s, on 6 test images at 448 px, with exact attention."""
    from fnabench.models.registry import load_model
    from fnabench.tasks.base import Settings
    from fnabench.tasks.registry import make_task

    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = make_task("mmseg:synthetic-dinov2s-linear", {"work_dir": str(tmp_path)})
    loaded = load_model("offline:dinov2-s", image_size=448)
    settings = Settings(image_size=448, batch_size=1, limit=6)
    prepared = task.prepare(loaded, settings)
    assert prepared.load_report["keys"] > 0
    metrics = task.evaluate(loaded, prepared, settings)
    # measured 51.43 mIoU / 72.94 aAcc on these 6 images (63.08 / 77.40 on all 48). Chance is 12.5 mIoU over
    # 8 classes; always answering background, these images' most frequent class (55 % of pixels), gives
    # 55.0 aAcc and 6.9 mIoU
    assert metrics["mIoU"] > 40 and metrics["aAcc"] > 65


def _logged_metrics(work_dir: Path) -> dict[str, float]:
    """The aAcc / mIoU / mAcc mmseg's logger wrote for the one run under ``work_dir``."""
    logs = list(work_dir.glob("*/*.log"))
    assert len(logs) == 1, logs
    return {k: float(v) for k, v in re.findall(r"(aAcc|mIoU|mAcc): ([0-9.]+)", logs[0].read_text())}


#: on CPU: mmengine's pytorch launcher calls torch.cuda.set_device, so the process group (gloo) is made first and
#: mmseg's tools/test.py then runs as ``--launcher pytorch`` in it (the runner skips init_dist when one exists)
_GLOO_FIRST = """
import runpy, sys
import torch.distributed as dist
dist.init_process_group("gloo")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_mmsegs_distributed_test_on_two_ranks_logs_the_miou_of_one_process(tmp_path):
    """mmseg's own ``tools/test.py`` with ``--launcher pytorch`` on two ranks (torch.distributed.run, gloo on
    CPU): each rank takes half the test images through the patched model and the metric gathers them; the
    logged aAcc / mIoU / mAcc equal one process's."""
    import os
    import subprocess
    import sys

    import mmseg

    test_py = Path(mmseg.__file__).parent / ".mim" / "tools" / "test.py"
    config = tmp_path / "tiny_seg.py"
    # mmseg's own ViT and FCN head (tools/test.py builds the config as written), FNA through the one-line hook
    text = _STOCK_BACKBONE_CONFIG.format(data_root=str(tmp_path / "data")).replace("num_test=3", "num_test=4")
    config.write_text(text + "custom_hooks = [dict(type='FNAPatchHook', variant='fna:m=8')]\n")
    exact = tmp_path / "tiny_seg_exact.py"
    exact.write_text(text + "custom_hooks = [dict(type='FNAPatchHook', variant='exact')]\n")
    torch.manual_seed(0)
    torch.save({"state_dict": _build_segmentor(_config(config)).state_dict()}, tmp_path / "weights.pth")
    (tmp_path / "gloo_first.py").write_text(_GLOO_FIRST)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    args = [str(test_py), str(config), str(tmp_path / "weights.pth")]
    # gloo, and DDP without device ids: the configs' defaults (nccl, device_ids=[LOCAL_RANK]) need GPUs
    cpu = ["--cfg-options", "env_cfg.dist_cfg.backend=gloo", "model_wrapper_cfg.type=MMDistributedDataParallel",
           "model_wrapper_cfg.device_ids=None", "model_wrapper_cfg.broadcast_buffers=False"]
    runs = {"one": [sys.executable, *args],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535",
                    str(tmp_path / "gloo_first.py"), *args, "--launcher", "pytorch", *cpu],
            "exact": [sys.executable, str(test_py), str(exact), str(tmp_path / "weights.pth")]}
    logs = {}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, "--work-dir", str(tmp_path / name)], capture_output=True, text=True, env=env,
                              timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        logs[name] = done.stdout + done.stderr
    assert "Distributed training: True" in logs["two"] and "GPU number: 2" in logs["two"]  # mmengine's words
    assert "Epoch(test) [2/2]" in logs["two"] and "Epoch(test) [4/4]" in logs["one"]  # 2 images a rank, 4 in one
    one, two = _logged_metrics(tmp_path / "one"), _logged_metrics(tmp_path / "two")
    assert set(one) == {"aAcc", "mIoU", "mAcc"} and two == one
    assert _logged_metrics(tmp_path / "exact") != one  # FNA moves these metrics: the equality is not exact's
