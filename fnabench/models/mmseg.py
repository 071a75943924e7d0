"""``mmseg:<config>`` as a model: the segmentor an mmsegmentation config builds, with fnabench's mmseg module
among its custom imports (the task half is :mod:`fnabench.tasks.mmseg_task`)."""

from __future__ import annotations

from pathlib import Path

import torch

from fnabench._extras import MissingExtraError
from fnabench.models.loaded import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelInputError, make_preprocess

PACKAGED = Path(__file__).resolve().parent / "offline" / "seg_head_configs"


HOOK = "FNAPatchHook"


ADAPTER = "fnabench.adapters.mmseg"


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
    raise ModelInputError(f"mmseg:{name}: no such config; accepted: a path to an mmseg .py config, one shipped with "
                    f"fnabench ({shipped}), or a name under mmseg's configs such as vit/vit_vit-b16_mln_upernet_"
                    "8xb2-80k_ade20k-512x512")


INSTALL = "pip install 'fnabench[seg]' && bash tools/install_mmcv.sh"


def require_seg() -> None:
    """mmseg and a compiled mmcv, or one line saying how to get them."""
    for module in ("mmseg", "mmengine", "mmcv._ext"):
        try:
            __import__(module)
        except ImportError as err:
            raise MissingExtraError(f"{module} is needed for mmseg tasks but not importable ({err}); "
                                    f"run: {INSTALL}") from None


def _config(path: Path):
    """The config with fnabench's mmseg module among its custom imports (registers hook, backbone, data)."""
    require_seg()
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


def _scope(cfg):
    """mmseg's registries as the default scope while building (nested types such as PackSegInputs)."""
    from mmengine.registry import DefaultScope

    return DefaultScope.overwrite_default_scope(cfg.get("default_scope") or "mmseg")


def _build_segmentor(cfg) -> torch.nn.Module:
    from mmseg.registry import MODELS

    with _scope(cfg):
        return MODELS.build(cfg.model)


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``mmseg:<config>``: the segmentor the config builds (weights: the mmseg task's ``checkpoint``)."""
    path = resolve_config(spec)
    try:
        cfg = _config(path)
        segmentor = _build_segmentor(cfg)
        segmentor.eval()  # some mmseg modules' train() return None: never chain it
    except ModelInputError:
        raise
    except Exception as err:  # mmengine raises many kinds for a config that does not build
        raise ModelInputError(f"mmseg:{spec}: the config's model does not build ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})") from None
    crop = (cfg.model.get("test_cfg") or {}).get("crop_size") or cfg.get("crop_size") or (512, 512)
    size = image_size or int(crop[0])
    return LoadedModel(f"mmseg:{spec}", segmentor, make_preprocess(size, IMAGENET_MEAN, IMAGENET_STD),
                       lambda x: segmentor(x, mode="tensor"), size, "mmseg", {"config": str(path)})
