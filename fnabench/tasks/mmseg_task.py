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

import contextlib
import copy
import io
import logging
import os
import pickle
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fnabench.data.cache import cache_root
from fnabench.models.loaded import LoadedModel, ModelInputError
from fnabench.models.mmseg import (
    HOOK,
    _build_segmentor,
    _config,
    _scope,
    require_seg,
    resolve_config,
)
from fnabench.patching.core import HANDLE_ATTR
from fnabench.tasks.base import TEXT, Option, Settings, TaskError, check_options, positive_int

_CHECKPOINT = Option((str, dict), "a path, or a table mapping model names to paths",
                     lambda v: isinstance(v, str) or all(isinstance(p, str) for p in v.values()))
OPTIONS: dict[str, Option] = {"checkpoint": _CHECKPOINT, "work_dir": TEXT, "data_root": TEXT,
                              "num_workers": positive_int(0)}














# ---------------------------------------------------------------------------------------------
# `mmseg:<config>` as a model




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
        try:
            self.path = resolve_config(config)
        except ModelInputError as err:  # the task's own error class for a config it cannot find
            raise TaskError(str(err)) from None
        require_seg()  # a sweep without the extra stops before any model loads
        self.options = options
        self.name = f"mmseg:{config}"
        self.measures = f"segmentor {config}"  # the runner counts and times the whole segmentor, head included
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
        from fnabench.adapters import mmseg as adapter

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

        with _scope(cfg):
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
        with warnings.catch_warnings():  # mmseg/mmengine deprecation notes on every run: the log file has them
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(mmseg|mmengine|mmcv)\b")
            runner = self.runner(loaded, prepared, settings)
            metrics = runner.test()
        # mmseg rounds to 2 decimals in float32: keep the decimal it means (what its log prints)
        out = {k: float(str(metrics[k])) for k in ("aAcc", "mIoU", "mAcc") if k in metrics}
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
        name = f"{_slug(variant)}-{time.strftime('%Y%m%d_%H%M%S')}-{os.getpid()}-{self._runs}"
        visualizer = dict(cfg.get("visualizer") or dict(type="SegLocalVisualizer"), name=name)  # one per run
        with contextlib.redirect_stdout(io.StringIO()):  # mmengine's environment banner: the log file has it
            runner = Runner(
                model=prepared.segmentor, work_dir=str(work_dir / _slug(variant)), experiment_name=name,
                test_dataloader=copy.deepcopy(cfg.test_dataloader), test_evaluator=copy.deepcopy(cfg.test_evaluator),
                test_cfg=cfg.get("test_cfg") or dict(type="TestLoop"), custom_hooks=hooks, load_from=None,
                default_hooks=copy.deepcopy(cfg.get("default_hooks")), default_scope=cfg.get("default_scope", "mmseg"),
                env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0)),
                log_processor=cfg.get("log_processor"), log_level="INFO", visualizer=visualizer, cfg=cfg)
        for h in runner.logger.handlers:  # mmseg's log file keeps everything; the terminal gets errors only
            if type(h) is logging.StreamHandler:
                h.setStream(sys.stdout)
                h.setLevel(logging.ERROR)
        return runner


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=,.+-]+", "_", text)[:120]


def _load_weights(segmentor: torch.nn.Module, checkpoint: str, task: str) -> dict:
    """Load an mmseg checkpoint; every key the segmentor saves must be in it, and nothing else.

    A local file is read as tensors only (torch's ``weights_only``): an mmengine training checkpoint that
    also pickles its loop state (``message_hub``) is refused in one line saying how to keep its weights."""
    from mmengine.runner.checkpoint import _load_checkpoint

    if "://" in checkpoint:
        state = _load_checkpoint(checkpoint, map_location="cpu", logger="silent")
    else:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).split("WeightsUnpickler error:")[-1].strip().split(".")[0]
            raise TaskError(f"{task}: checkpoint {checkpoint} holds more than tensors ({first}); keep its weights "
                            "with torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, "
                            "path) if you trust it") from None
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
