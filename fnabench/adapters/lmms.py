"""lmms-eval model ``fnabench``: a LLaVA-family transformers model with a fnabench variant patched in.

Registered through the entry-point group ``lmms_eval.models`` (pyproject.toml → :func:`manifests`), so
``python -m lmms_eval --model fnabench --model_args pretrained=DIR,variant=fna:m=64,tower=text``
finds it with fnabench installed. ``--model_args`` keys:

- ``pretrained``: a local checkpoint folder or a hub id (transformers' own cache);
- ``variant``: any fnabench spec. Its own commas may stay: keys after ``variant=`` that are not one of
  this model's arguments belong to the spec (``variant=fna:m=64,layers=12:,tower=text``), or
  write ``;`` for them (``variant=fna:m=64;layers=12:``). Where the variant goes is the spec's own
  ``tower``: ``image`` (the vision tower, the default), ``text`` (the language model) or ``all``;
- ``placement``: the older word for it, kept: ``vision``, ``language`` or ``both`` (image, text, all);
- ``dtype`` (float32), ``device`` (cpu, or cuda), ``batch_size`` (1), ``max_new_tokens`` (default for
  tasks that set none: 32).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fnabench._extras import require
from fnabench.models import llava
from fnabench.patching.core import patch

logger = logging.getLogger("fnabench")
lmms_base = require("lmms_eval.api.model").lmms

MODEL_ID = "fnabench"
#: this model's own --model_args keys; any other key given after variant= is a key of the variant spec
#: (``tower=image|text|all`` is a key of the variant spec, as everywhere; ``placement=vision|language|both`` is
#: its older alias, kept)
OWN_ARGS = ("pretrained", "variant", "placement", "dtype", "device", "batch_size", "max_batch_size",
            "max_new_tokens")


def manifests():
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` for model id ``fnabench``."""
    registry = require("lmms_eval.models.registry_v2")
    return [registry.ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.FnabenchLLaVA")]


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def variant_spec(variant: str, extra: dict[str, Any]) -> str:
    """The variant string from ``variant=`` plus the spec keys lmms-eval's comma split separated from it."""
    spec = str(variant).strip().strip("'\"").replace(";", ",")
    tail = ",".join(f"{k}={_format(v)}" for k, v in extra.items())
    if not tail:
        return spec
    return f"{spec}{',' if ':' in spec.split('+')[-1] else ':'}{tail}"


class FnabenchLLaVA(lmms_base):
    """A LLaVA-family model under a fnabench variant, as an lmms-eval "simple" model (one image per prompt
    placed before the text through the processor's chat template; greedy generation)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, variant: str = "exact", placement: str | None = None,
                 dtype: str = "float32", device: str = "cpu", batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_new_tokens: int = 32, *, model=None, processor=None,
                 patched: bool = False, **spec_keys: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("fnabench: --model_args needs pretrained=<folder or hub id>")
            model, processor = llava.load_pretrained(str(pretrained), dtype=getattr(torch, str(dtype)),
                                                     device=str(device))
        self._model, self.processor = model, processor
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.handle = None
        if patched:  # the caller (fnabench's harness) patched the model already
            self.variant = None
        else:
            self.variant = llava.place(variant_spec(variant, spec_keys), placement)
            self.handle = patch(model, self.variant)
            logger.info("fnabench: %s patched with %s", type(model).__name__, self.handle.variant.canonical)

    @classmethod
    def from_loaded(cls, loaded, *, batch_size: int = 1) -> FnabenchLLaVA:
        """Wrap a model the harness loaded and patched (``LoadedModel`` from adapters/llava.py)."""
        return cls(model=loaded.model, processor=loaded.extra["processor"], patched=True, batch_size=batch_size)

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    def close(self) -> None:
        """Remove the patch this wrapper applied."""
        if self.handle is not None:
            self.handle.remove()

    # ------------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def _prompt(self, context: str, images: list) -> str:
        return llava.prompt_text(self.processor, context, images=len(images))

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut at the first stop string (``until``)."""
        out: list[str] = []
        args = [r.args for r in requests]
        for start in range(0, len(args), self.batch_size):
            chunk = args[start:start + self.batch_size]
            kwargs = dict(chunk[0][1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            images = [self._visuals(*a[2:]) for a in chunk]
            inputs = llava.encode(self.processor, [self._prompt(a[0], im) for a, im in zip(chunk, images, strict=True)],
                                  images)
            texts = llava.generate(self._model, self.processor, inputs,
                                   max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                                   num_beams=int(kwargs.get("num_beams", 1) or 1))
            for text in texts:
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out.append(text.strip())
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its prompt, and whether greedy decoding gives it."""
        out = []
        tokenizer = self.processor.tokenizer
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            images = self._visuals(doc_to_visual, doc_id, task, split)
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            prompt = self._prompt(context, images)
            inputs = llava.encode(self.processor, [prompt], [images])
            cont = tokenizer(str(continuation), add_special_tokens=False, return_tensors="pt").input_ids
            inputs["input_ids"] = torch.cat([inputs["input_ids"], cont], 1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            with torch.no_grad():
                prepared = llava.model_inputs(self._model, inputs)
                logits = self._model(**prepared).logits[0, -cont.shape[1] - 1:-1].float()
            logp = torch.log_softmax(logits, -1)
            target = cont[0].to(logp.device)
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fnabench: multi-round generation is not supported; accepted: generate_until "
                                  "and loglikelihood tasks")
