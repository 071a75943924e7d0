"""``mmseg:<config>``: semantic segmentation with mmsegmentation's own test loop, data and metric.

The task builds an mmengine ``Runner`` around the cell's model, with the config's ``test_dataloader``,
``test_evaluator`` and hooks, and returns what ``Runner.test()`` returns: ``aAcc``, ``mIoU`` and ``mAcc``
(percent). mmseg writes its own log for every evaluation under ``work_dir/<variant>/``, so each record's
mIoU can be checked against mmseg's. Counted FLOPs and latency are those of the whole segmentor
(backbone, neck and decode head) on a batch of preprocessed test inputs: the full image for
``test_cfg.mode='whole'``, one crop window for ``mode='slide'`` (the record says ``per``).

Two kinds of cell model:

- any fnabench model (``offline:dinov2-s``, ``timm:…``, ``hf:…``): the config's backbone must be
  ``FnabenchBackbone``; the cell's model is served into it (its ``model`` key is replaced), and a
  ``LinearBNHead``'s channels follow the backbone's;
- ``mmseg:<config>`` models: the segmentor exactly as that config builds it (stock backbones such as
  mmseg's ``VisionTransformer``), weights from the task's ``checkpoint``.

``<config>`` is a path to an mmseg config, a config shipped with fnabench (``synthetic-dinov2s-linear``), or
one of mmseg's own (``vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512``, from the installed wheel).
Weights come from the option ``checkpoint`` (a path, or a table mapping model names to paths), else the
config's ``load_from``.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._extras import require
from ..adapters.core import HANDLE_ATTR
from ..adapters.loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelInputError, make_preprocess
from .base import TEXT, Option, Settings, TaskError, check_options, positive_int
from .shapes import cache_root

PACKAGED = Path(__file__).parent / "mmseg_configs"
HOOK = "FNAPatchHook"
ADAPTER = "fnabench.adapters.mmseg"

_CHECKPOINT = Option((str, dict), "a path, or a table mapping model names to paths",
                     lambda v: isinstance(v, str) or all(isinstance(p, str) for p in v.values()))
OPTIONS: dict[str, Option] = {"checkpoint": _CHECKPOINT, "work_dir": TEXT, "data_root": TEXT,
                              "num_workers": positive_int(0)}


def resolve_config(name: str) -> Path:
    """An mmseg config by path, by the name of one shipped with fnabench, or relative to mmseg's own."""
    candidates = [Path(name).expanduser(), PACKAGED / f"{name}.py"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("mmseg")
        if spec is not None and spec.submodule_search_locations:
            mim = Path(next(iter(spec.submodule_search_locations))) / ".mim" / "configs"
            candidates += [mim / name, mim / f"{name}.py"]
    except (ImportError, ValueError):
        pass
    for path in candidates:
        if path.is_file() and path.suffix == ".py":
            return path.resolve()
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.py")))
    raise TaskError(f"mmseg:{name}: no such config; accepted: a path to an mmseg .py config, one shipped with "
                    f"fnabench ({shipped}), or a name under mmseg's configs such as vit/vit_vit-b16_mln_upernet_"
                    "8xb2-80k_ade20k-512x512")


def _config(path: Path):
    """The config with fnabench's mmseg module among its custom imports (registers hook, backbone, data)."""
    require("mmseg")
    from mmengine.config import Config

    cfg = Config.fromfile(str(path))
    imports = dict(cfg.get("custom_imports") or {})
    names = list(imports.get("imports", []))
    if ADAPTER not in names:
        names.append(ADAPTER)
    cfg.custom_imports = dict(imports, imports=names, allow_failed_imports=False)
    import importlib

    for name in names:
        importlib.import_module(name)
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return cfg


def _build_segmentor(cfg) -> torch.nn.Module:
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    with DefaultScope.overwrite_default_scope(cfg.get("default_scope") or "mmseg"):
        return MODELS.build(cfg.model)


# ---------------------------------------------------------------------------------------------
# `mmseg:<config>` as a model


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``mmseg:<config>``: the segmentor the config builds (weights: the mmseg task's ``checkpoint``)."""
    path = resolve_config(spec)
    try:
        cfg = _config(path)
        segmentor = _build_segmentor(cfg)
        segmentor.eval()  # some mmseg modules' train() return None: never chain it
    except TaskError:
        raise
    except Exception as err:  # mmengine raises many kinds for a config that does not build
        raise ModelInputError(f"mmseg:{spec}: the config's model does not build ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})") from None
    crop = (cfg.model.get("test_cfg") or {}).get("crop_size") or cfg.get("crop_size") or (512, 512)
    size = image_size or int(crop[0])
    return LoadedModel(f"mmseg:{spec}", segmentor, make_preprocess(size, IMAGENET_MEAN, IMAGENET_STD),
                       lambda x: segmentor(x, mode="tensor"), size, "mmseg", {"config": str(path)})


# ---------------------------------------------------------------------------------------------
# the task


@dataclass
class Prepared:
    segmentor: torch.nn.Module
    cfg: Any
    inputs: torch.Tensor  # [B, 3, H, W] preprocessed test inputs (or crop windows) for FLOPs and timing
    num_test: int
    checkpoint: str | None
    load_report: dict = field(default_factory=dict)


class MmsegTask:
    """mmseg's test loop (aAcc, mIoU, mAcc) on the cell's segmentor, with the cell's variant patched in."""

    primary = "mIoU"

    def __init__(self, config: str, **options: Any) -> None:
        self.config_name = config
        self.path = resolve_config(config)
        self.options = options
        self.name = f"mmseg:{config}"
        self.higher_is_better = {"mIoU": True, "aAcc": True, "mAcc": True}
        self.per = "image"
        self._runs = 0

    # -- preparation (exact attention) ---------------------------------------------------------

    def prepare(self, loaded: LoadedModel, settings: Settings) -> Prepared:
        cfg = _config(self.path)
        if loaded.family == "mmseg":
            segmentor = loaded.model
        else:
            segmentor = self._segmentor_around(cfg, loaded)
        segmentor.to(settings.device)
        segmentor.eval()
        checkpoint = self._checkpoint(cfg, loaded.name)
        report = _load_weights(segmentor, checkpoint, self.name) if checkpoint else {}
        self._limit_test_data(cfg, settings)
        mode = (cfg.model.get("test_cfg") or {}).get("mode", "whole")
        self.per = "crop" if mode == "slide" else "image"
        inputs, count = self._example_inputs(cfg, segmentor, settings, mode)
        return Prepared(segmentor, cfg, inputs, count, checkpoint, report)

    def _segmentor_around(self, cfg, loaded: LoadedModel) -> torch.nn.Module:
        backbone = cfg.model.get("backbone") or {}
        if backbone.get("type") not in ("FnabenchBackbone", "mmseg.FnabenchBackbone"):
            raise TaskError(f"{self.name}: model {loaded.name} needs a config whose backbone is FnabenchBackbone "
                            f"(this one has {backbone.get('type')!r}); for a stock backbone use the model "
                            f"mmseg:{self.config_name}")
        from ..adapters import mmseg as adapter

        cfg.model.backbone.model = loaded.name
        cfg.model.backbone.image_size = loaded.image_size
        with adapter.serving(loaded.name, loaded):
            probe = adapter.FnabenchBackbone(**{k: v for k, v in cfg.model.backbone.items() if k != "type"})
            head = cfg.model.decode_head
            if head.get("type") in ("LinearBNHead", "mmseg.LinearBNHead"):  # its width follows the backbone's
                index = head.get("in_index", -1)
                picks = index if isinstance(index, (list, tuple)) else [index]
                channels = [probe.out_channels[i] for i in picks]
                head.in_channels = channels if isinstance(index, (list, tuple)) else channels[0]
                head.channels = sum(channels)
            return _build_segmentor(cfg)

    def _checkpoint(self, cfg, model_name: str) -> str | None:
        given = self.options.get("checkpoint")
        if isinstance(given, dict):
            if model_name not in given:
                raise TaskError(f"{self.name}: option checkpoint has no entry for {model_name}; "
                                f"it names {', '.join(sorted(given))}")
            given = given[model_name]
        path = given or cfg.get("load_from")
        if path and "://" not in str(path) and not Path(path).expanduser().is_file():
            raise TaskError(f"{self.name}: checkpoint {str(path)!r} not found; accepted: a path to an mmseg "
                            "checkpoint (option checkpoint, or the config's load_from)")
        return str(Path(path).expanduser()) if path and "://" not in str(path) else path

    def _limit_test_data(self, cfg, settings: Settings) -> None:
        loader = cfg.test_dataloader
        if self.options.get("data_root"):
            loader.dataset.data_root = self.options["data_root"]
        if settings.limit:
            loader.dataset.indices = int(settings.limit)
        workers = self.options.get("num_workers", loader.get("num_workers", 0))
        loader.num_workers = workers
        loader.persistent_workers = bool(workers) and loader.get("persistent_workers", False)

    def _example_inputs(self, cfg, segmentor, settings: Settings, mode: str) -> tuple[torch.Tensor, int]:
        """A batch of test inputs as the segmentor sees them (data preprocessor applied), and the test size."""
        from mmseg.registry import DATASETS

        dataset = DATASETS.build(copy.deepcopy(cfg.test_dataloader.dataset))
        if len(dataset) == 0:
            raise TaskError(f"{self.name}: the test set is empty (data_root "
                            f"{cfg.test_dataloader.dataset.get('data_root')!r})")
        samples = [dataset[i] for i in range(min(settings.batch_size, len(dataset)))]
        with torch.no_grad():
            data = segmentor.data_preprocessor({"inputs": [s["inputs"] for s in samples],
                                                "data_samples": [s["data_samples"] for s in samples]}, False)
        inputs = data["inputs"]
        if mode == "slide":  # one crop window per image: what the backbone sees per forward
            ch, cw = cfg.model.test_cfg.crop_size
            inputs = inputs[..., :ch, :cw]
        return inputs.cpu(), len(dataset)

    def example_batch(self, prepared: Prepared, settings: Settings) -> torch.Tensor:
        return prepared.inputs[: settings.batch_size]

    def forward(self, loaded: LoadedModel, prepared: Prepared):
        """What FLOPs and latency are measured on: the whole segmentor on preprocessed inputs."""
        segmentor = prepared.segmentor
        return lambda x: segmentor(x, mode="tensor")

    def items(self, prepared: Prepared) -> dict[str, int]:
        return {"test": prepared.num_test}

    # -- evaluation (the cell's variant patched in) -----------------------------------------

    def evaluate(self, loaded: LoadedModel, prepared: Prepared, settings: Settings) -> dict[str, float]:
        runner = self.runner(loaded, prepared, settings)
        metrics = runner.test()
        out = {k: float(metrics[k]) for k in ("aAcc", "mIoU", "mAcc") if k in metrics}
        if "mIoU" not in out:
            raise RuntimeError(f"{self.name}: mmseg's test loop returned no mIoU ({sorted(metrics)})")
        return out

    def runner(self, loaded: LoadedModel, prepared: Prepared, settings: Settings):
        """An mmengine Runner for the config's test loop around the (patched) segmentor."""
        from mmengine.runner import Runner

        cfg = prepared.cfg
        handle = loaded.model.__dict__.get(HANDLE_ATTR)
        variant = handle.variant.short if handle is not None and handle.active else "unpatched"
        work_dir = Path(self.options.get("work_dir") or cache_root() / "mmseg-work" / self.path.stem)
        self._runs += 1
        hooks = [h for h in (cfg.get("custom_hooks") or []) if h.get("type") not in (HOOK, f"mmseg.{HOOK}")]
        runner = Runner(
            model=prepared.segmentor, work_dir=str(work_dir / _slug(variant)),
            test_dataloader=copy.deepcopy(cfg.test_dataloader), test_cfg=cfg.get("test_cfg") or dict(type="TestLoop"),
            test_evaluator=copy.deepcopy(cfg.test_evaluator), default_hooks=copy.deepcopy(cfg.get("default_hooks")),
            custom_hooks=hooks, load_from=None, default_scope=cfg.get("default_scope", "mmseg"),
            env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0)),
            log_processor=cfg.get("log_processor"), log_level="INFO", visualizer=cfg.get("visualizer"),
            experiment_name=f"{_slug(variant)}-{time.strftime('%Y%m%d_%H%M%S')}-{os.getpid()}-{self._runs}",
            cfg=cfg)
        if settings.quiet:  # mmseg's log file keeps everything; the terminal only warnings
            for h in runner.logger.handlers:
                if type(h) is logging.StreamHandler:
                    h.setLevel(logging.WARNING)
        return runner


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=,.+-]+", "_", text)[:120]


def _load_weights(segmentor: torch.nn.Module, checkpoint: str, task: str) -> dict:
    """Load an mmseg checkpoint; every key the segmentor saves must be in it, and nothing else."""
    from mmengine.runner.checkpoint import _load_checkpoint

    state = _load_checkpoint(checkpoint, map_location="cpu")
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = set(segmentor.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise TaskError(f"{task}: checkpoint {checkpoint} does not fit the segmentor (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    segmentor.load_state_dict(state, strict=False)
    return {"keys": len(state)}


def make_task(config: str, **options) -> MmsegTask:
    """Registry factory: ``mmseg:<config>`` with options checkpoint, work_dir, data_root, num_workers."""
    return MmsegTask(config, **check_options(f"mmseg:{config}", options, OPTIONS))


make_task.options = OPTIONS
