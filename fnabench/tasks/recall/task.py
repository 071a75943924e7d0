"""The recall suite in the harness: trained recall GPT-2s as models, recall error as a task.

Model ``recall:<preset-or-run>[@seedN]``: a run folder, or a preset trained on demand once and cached
by the hash of its full config under ``$FNABENCH_CACHE/recall`` (default ``~/.cache/fnabench``).
Task ``recall:<probes>``: the error at k = 1 (recall) and k = 2, 3 (continuation) after the query's
open label, on the in-distribution query (``err_k*``) and on each OOD probe (``<probe>_err_k*``),
medians over traces then over haystack examples, under whatever variant is patched in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fnabench.data import cache as data_cache
from fnabench.data.cache import content_hash
from fnabench.models.loaded import LoadedModel, ModelInputError
from fnabench.tasks.base import Option, Settings, TaskError, check_options, positive_int
from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.evaluate import _example_model_medians, load_checkpoint
from fnabench.tasks.recall.presets import PRESETS, get_preset
from fnabench.tasks.recall.queries import iter_examples
from fnabench.tasks.recall.run_config import PROBES
from fnabench.tasks.recall.systems import make_corpus
from fnabench.tasks.recall.tokens import TokenLayout
from fnabench.tasks.recall.training import train

KS = (1, 2, 3)


def cache_root() -> Path:
    """Where trained-on-demand recall runs live: ``recall/`` under fnabench's cache folder (data/cache.py)."""
    return data_cache.cache_root() / "recall"


def run_folder(preset: str, seed: int) -> tuple[Path, Any]:
    """(cache folder, config) of preset ``preset`` trained with ``seed``: named by the config's hash."""
    config = get_preset(preset)
    config = replace(config, train=replace(config.train, seed=seed)).validate()
    digest = content_hash(config.to_dict(), 10)
    return cache_root() / f"{preset}-seed{seed}-{digest}", config


def _parse(spec: str) -> tuple[str, int | None]:
    name, _, seed = spec.partition("@")
    if not seed:
        return name, None
    if not (seed.startswith("seed") and seed[4:].isdigit()):
        raise ModelInputError(f"recall:{spec}: bad seed {seed!r}; accepted: recall:<preset-or-run>@seedN, "
                        "e.g. recall:cpu@seed1")
    return name, int(seed[4:])


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``recall:<preset-or-run>[@seedN]``: the last checkpoint of a run folder, or of a preset's cached run."""

    name, seed = _parse(spec)
    if Path(name).is_dir():
        folder, config = Path(name), rundir.load_config(name)
    elif name in PRESETS:
        folder, config = run_folder(name, 0 if seed is None else seed)
    else:
        raise ModelInputError(f"recall:{spec}: neither a run folder nor a preset; accepted: a folder made by "
                        f"'fnabench recall train', or one of {', '.join(PRESETS)} (optionally @seedN)")
    checkpoints = rundir.list_checkpoints(folder)
    if not checkpoints or checkpoints[-1][0] < config.train.steps:
        if folder.parent != cache_root():
            raise TaskError(f"recall:{spec}: {folder} has not finished training; resume it with "
                            f"'fnabench recall train --out {folder}'")
        train(folder, config, progress=False)  # on demand, once; resumes an interrupted run
        checkpoints = rundir.list_checkpoints(folder)
    model, counters = load_checkpoint(config, checkpoints[-1][1])
    label = f"recall:{name}@seed{config.train.seed}" if not Path(name).is_dir() else f"recall:{name}"
    return LoadedModel(label, model, preprocess=lambda x: x, embed=model, image_size=None, family="recall",
                       extra={"config": config, "run_dir": str(folder), "step": counters["step"],
                              "decoder": _Decoder(model)})


@dataclass
class _Decoder:
    """Prefill and one decoding step of the recall GPT-2 through its KV cache (for the runner's cache
    size and per-step FLOPs: the task itself predicts every position in one causal pass)."""

    model: Any

    def prefill(self, tokens: torch.Tensor) -> Any:
        """The KV cache a prefill of ``tokens`` [B, T, dim] leaves (compressed if the variant says so)."""
        with torch.no_grad():
            out = self.model.backbone(inputs_embeds=self.model.read_in(tokens), use_cache=True)
        return out.cache if hasattr(out, "cache") else out.past_key_values  # transformers ≥ 5.2x: ``cache``

    def step(self, token: torch.Tensor, cache: Any) -> torch.Tensor:
        """The next-state prediction for one more token [B, 1, dim] decoded on ``cache``."""
        backbone = self.model.backbone
        name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
        hidden = backbone(inputs_embeds=self.model.read_in(token), use_cache=True, **{name: cache}).last_hidden_state
        return self.model.read_out(hidden)


OPTIONS = {
    "examples": positive_int(),
    "traces": positive_int(),
}


@dataclass
class RecallTask:
    """Recall/continuation error of a trained recall GPT-2 under the patched variant."""

    probes: tuple[str, ...]
    examples: int | None = None
    traces: int | None = None
    primary: str = "err_k1"
    per: str = "trace"

    @property
    def name(self) -> str:
        return "recall:" + ",".join(self.probes)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {m: False for m in self.metric_names()}

    def metric_names(self) -> list[str]:
        return [f"{'' if p == 'none' else p + '_'}err_k{k}" for p in self.probes for k in KS]

    def prepare(self, loaded: LoadedModel, settings: Settings) -> dict:
        """The fixed query sets (the same for every variant), built from the run's own validation systems."""

        config = _config_of(loaded)
        cfg = replace(config.eval, ks=KS)
        systems = make_corpus(config.data).val
        sets = {p: list(iter_examples(systems, config.data, cfg, p, self.examples, self.traces)) for p in self.probes}
        return {"config": config, "cfg": cfg, "sets": sets}

    def example_batch(self, prepared: dict, settings: Settings) -> torch.Tensor:
        example = prepared["sets"][self.probes[0]][0]
        return torch.from_numpy(np.ascontiguousarray(example.tokens[: settings.batch_size, :-1]))

    def items(self, prepared: dict) -> dict[str, int]:
        first = prepared["sets"][self.probes[0]]
        return {"test": len(first), "traces": int(first[0].tokens.shape[0])}

    def evaluate(self, loaded: LoadedModel, prepared: dict, settings: Settings) -> dict[str, float]:

        config, cfg = prepared["config"], prepared["cfg"]
        layout = TokenLayout(config.data.state_dim, config.data.num_labels)
        model = loaded.model
        out: dict[str, float] = {}
        for probe, examples in prepared["sets"].items():
            rows = [_example_model_medians(model, ex, replace(cfg, batch=settings.batch_size * 64), layout)
                    for ex in examples]
            for k in KS:
                name = f"{'' if probe == 'none' else probe + '_'}err_k{k}"
                out[name] = float(np.median([r["final"][k] for r in rows]))
        return out


def _config_of(loaded: LoadedModel):
    config = loaded.extra.get("config")
    if config is None:
        raise TaskError(f"recall tasks need a recall model (recall:<preset-or-run>), got {loaded.name}")
    return config


def make_task(source: str, **options) -> RecallTask:
    """Registry factory: ``recall:<probes>``, probes comma-separated from none (the in-distribution
    query), misdirected, sync, unseen_label, unseen_system, or ``all``."""
    probes = PROBES if source == "all" else tuple(p.strip() for p in source.split(","))
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise TaskError(f"recall:{source}: unknown probe(s) {', '.join(map(repr, bad))}; accepted: "
                        f"{', '.join(PROBES)} (comma-separated) or all")
    return RecallTask(probes, **check_options(f"recall:{source}", options, OPTIONS))


make_task.options: dict[str, Option] = OPTIONS
