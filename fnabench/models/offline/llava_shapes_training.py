"""Training the offline VQA model: projector and language model on frozen DINOv2-S patch features.

The vision tower is frozen, so its patch features (LLaVA's selected layer, CLS dropped) are computed
once per scene and cached. Every question about a scene shares that scene's image tokens: one training
sequence holds the prompt prefix ("USER:" and the image tokens) once, then each question with its
answer as its own segment, which sees the prefix and itself only (a block mask, positions restarting
after the prefix), so each segment is exactly the sequence the model sees at inference. The loss is
cross-entropy on the answer tokens and the end-of-sequence token.

Validation accuracy is teacher-forced exact match of the whole answer and its end token, which is
the same as greedy decoding getting the answer exactly right.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fnabench._errors import UserError
from fnabench._io import write_atomic
from fnabench.data.cache import cache_root, content_hash
from fnabench.data.generated import vqa as sc
from fnabench.models.offline.llava_shapes_arch import EOS, IMAGE, PAD, Architecture, build_model, build_processor

#: marker written last into a finished checkpoint folder
DONE = "fnabench_training.json"


@dataclass(frozen=True)
class TrainConfig:
    """What to train on and how long; with :class:`Architecture` it names the cached checkpoint."""

    arch: Architecture = field(default_factory=Architecture)
    train_scenes: int = 1200
    val_scenes: int = 160
    seed: int = 0
    steps: int = 1600
    batch: int = 12
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.01
    #: curriculum: the first steps draw only scenes with at most two objects, where reading an object's
    #: colour and shape is learnt before telling objects apart by quadrant (without it the small model sat
    #: at chance on colour and shape for hundreds of steps while it learnt to count)
    easy_steps: int = 400
    easy_objects: int = 2

    def to_dict(self) -> dict:
        return {**asdict(self), "arch": self.arch.to_dict(), "version": sc.VERSION}

    def digest(self) -> str:
        return content_hash(self.to_dict(), 10)


def default_folder(config: TrainConfig) -> Path:
    """Where the checkpoint of ``config`` is cached: ``$FNABENCH_CACHE/vqa/llava-shapes-<hash>``."""
    return cache_root() / "vqa" / f"llava-shapes-{config.digest()}"


def prompt_text(question: str) -> str:
    """The prompt the chat template renders for one question (tests check it against the processor's)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def encode(tokenizer, question: str, answer: str | None, image_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids with the image placeholder expanded, answer ids + end token) for one question."""
    prompt = prompt_text(question).replace("<image>", "<image>" * image_tokens)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    target = [] if answer is None else [*tokenizer(answer, add_special_tokens=False).input_ids, EOS]
    return ids, target


@torch.no_grad()
def image_features(model, processor, images: list, batch: int = 16,
                   progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """[n, tokens, D] float16: the vision tower's selected patch features (LLaVA's layer, CLS dropped)."""
    out = []
    config = model.config
    for start in range(0, len(images), batch):
        pixels = processor.image_processor(images[start:start + batch], return_tensors="pt").pixel_values
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = hidden[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        out.append(feats.half())
        if progress:
            progress(f"features {min(start + batch, len(images))}/{len(images)}")
    return torch.cat(out)


@dataclass
class Packed:
    """One scene's training sequence: ids, labels (-100 = no loss), positions, segment of each token."""

    ids: list[int]
    labels: list[int]
    positions: list[int]
    segment: list[int]  # 0 = the shared prefix, j >= 1 = question j
    scene: int


def pack(tokenizer, scene: sc.Scene, index: int, image_tokens: int) -> Packed:
    """The shared prefix (up to the last image token), then every question of ``scene`` as a segment."""
    ids, labels, positions, segment = [], [], [], []
    for j, q in enumerate(scene.questions(), start=1):
        prompt, target = encode(tokenizer, q.text, q.answer, image_tokens)
        cut = max(i for i, t in enumerate(prompt) if t == IMAGE) + 1
        if not ids:
            ids, labels = prompt[:cut], [-100] * cut
            positions, segment = list(range(cut)), [0] * cut
        body = prompt[cut:] + target
        ids += body
        labels += [-100] * (len(prompt) - cut) + target  # as transformers: the loss shifts them by one
        positions += list(range(cut, cut + len(body)))
        segment += [j] * len(body)
    return Packed(ids, labels, positions, segment, index)


def collate(items: list[Packed]) -> dict[str, torch.Tensor]:
    """Right-padded tensors and the block mask: a segment sees the prefix and its own earlier tokens."""
    n = max(len(p.ids) for p in items)
    ids = torch.full((len(items), n), PAD, dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    positions = torch.zeros(len(items), n, dtype=torch.long)
    segment = torch.full((len(items), n), -1, dtype=torch.long)
    for i, p in enumerate(items):
        k = len(p.ids)
        ids[i, :k], labels[i, :k] = torch.tensor(p.ids), torch.tensor(p.labels)
        positions[i, :k], segment[i, :k] = torch.tensor(p.positions), torch.tensor(p.segment)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    prefix = (segment[:, None, :] == 0) & (segment[:, :, None] >= 0)
    mask = causal & (same | prefix)
    mask |= torch.eye(n, dtype=torch.bool)  # padding rows see themselves (no empty softmax row)
    return {"ids": ids, "labels": labels, "positions": positions, "mask": mask[:, None],
            "scenes": torch.tensor([p.scene for p in items])}


def forward_logits(model, batch: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Logits of a packed batch: the LLaVA merge (projected features at the image tokens), then the LM."""
    embeds = model.get_input_embeddings()(batch["ids"])
    feats = model.model.multi_modal_projector(features[batch["scenes"]].float())
    image = batch["ids"] == IMAGE
    embeds = embeds.masked_scatter(image[..., None], feats.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["mask"],
                                        position_ids=batch["positions"]).last_hidden_state
    return model.lm_head(hidden)


def _answer_positions(p: Packed) -> list[list[int]]:
    """Per question, the positions (into labels[1:]) whose prediction is an answer or end token."""
    out: dict[int, list[int]] = {}
    for pos in range(1, len(p.labels)):
        if p.labels[pos] != -100:
            out.setdefault(p.segment[pos], []).append(pos - 1)
    return [out[k] for k in sorted(out)]


@torch.no_grad()
def evaluate(model, packs: list[Packed], features: torch.Tensor, items: list[sc.Scene],
             batch: int = 16) -> dict[str, float]:
    """Teacher-forced exact-match accuracy over every question of ``packs``: overall and per kind."""
    model.eval()
    right: dict[str, list[bool]] = {kind: [] for kind in sc.KINDS}
    for start in range(0, len(packs), batch):
        chunk = packs[start:start + batch]
        b = collate(chunk)
        pred = forward_logits(model, b, features)[:, :-1].argmax(-1)
        gold = b["labels"][:, 1:]
        for i, p in enumerate(chunk):
            for q, positions in zip(items[p.scene].questions(), _answer_positions(p), strict=True):
                right[q.kind].append(bool((pred[i, positions] == gold[i, positions]).all()))
    out = {kind: round(sum(v) / len(v), 4) for kind, v in right.items() if v}
    out["all"] = round(sum(sum(v) for v in right.values()) / max(sum(len(v) for v in right.values()), 1), 4)
    return out


def _lr(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    done = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def _features(config: TrainConfig, split: str, seed: int, model, processor, items: list[sc.Scene], log) -> torch.Tensor:
    """The frozen tower's features of ``items``, cached under ``$FNABENCH_CACHE/vqa/features`` (they depend
    on the scenes, the image size and the feature layer only, not on how the rest is trained)."""
    arch = config.arch
    path = (cache_root() / "vqa" / "features" /
            f"v{sc.DRAW_VERSION}-px{arch.image_size}-layer{arch.feature_layer}-{split}-n{len(items)}-seed{seed}.pt")
    if path.is_file():
        return torch.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    px = arch.image_size
    feats = image_features(model, processor, [s.image(px) for s in items], progress=log)
    write_atomic(path, lambda tmp: torch.save(feats, tmp))
    return feats


def train(folder: str | os.PathLike | None = None, config: TrainConfig | None = None, *,
          log: Callable[[str], None] | None = None) -> Path:
    """Train (or find already trained) the offline VQA model; returns its checkpoint folder.

    The folder holds the transformers checkpoint, the processor, and ``fnabench_training.json`` (config,
    validation accuracy, chance, wall time, threads). Image features are cached (see :func:`_features`), so an
    interrupted run only retrains the projector and language model.
    """
    config = config or TrainConfig()
    out = Path(folder) if folder is not None else default_folder(config)
    marker = out / DONE
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored.get("config") != config.to_dict():
            raise UserError(f"{out} holds a VQA model trained with another config; accepted: an empty folder "
                            "or the folder of this config")
        return out
    log = log or (lambda _msg: None)
    out.mkdir(parents=True, exist_ok=True)
    arch = config.arch
    t0 = time.perf_counter()
    model = build_model(arch, seed=config.seed)
    processor = build_processor(arch)
    tokenizer = processor.tokenizer
    train_items = sc.scenes(config.train_scenes, seed=config.seed)
    val_items = sc.scenes(config.val_scenes, seed=config.seed + 10_000)
    train_feats = _features(config, "train", config.seed, model, processor, train_items, log)
    val_feats = _features(config, "val", config.seed + 10_000, model, processor, val_items, log)
    t_features = time.perf_counter() - t0
    train_packs = [pack(tokenizer, s, i, arch.image_tokens) for i, s in enumerate(train_items)]
    val_packs = [pack(tokenizer, s, i, arch.image_tokens) for i, s in enumerate(val_items)]

    trainable = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    rng = np.random.default_rng([config.seed, 7])
    easy = [i for i, s in enumerate(train_items) if len(s.things) <= config.easy_objects]
    order: list[int] = []
    t1 = time.perf_counter()
    history = []
    for step in range(config.steps):
        model.train()
        if step == config.easy_steps:
            order = []
        if len(order) < config.batch:
            pool = easy if step < config.easy_steps else list(range(len(train_packs)))
            order += [pool[i] for i in rng.permutation(len(pool))]
        chosen, order = order[:config.batch], order[config.batch:]
        b = collate([train_packs[i] for i in chosen])
        logits = forward_logits(model, b, train_feats)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten())
        for group in opt.param_groups:
            group["lr"] = _lr(config, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            acc = evaluate(model, val_packs[:48], val_feats, val_items)
            history.append({"step": step + 1, "loss": float(loss.detach()), "val_exact_match_subset": acc})
            log(f"step {step + 1}/{config.steps} loss {float(loss.detach()):.4f} val exact match (48 scenes) {acc} "
                f"{time.perf_counter() - t1:.0f}s")
    model.eval()
    val_acc = evaluate(model, val_packs, val_feats, val_items)
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"config": config.to_dict(), "val_exact_match": val_acc, "val_questions": sum(
        len(s.questions()) for s in val_items), "chance": 1 / 4, "feature_seconds": round(t_features, 1),
            "train_seconds": round(time.perf_counter() - t1, 1), "threads": torch.get_num_threads(),
            "history": history}
    marker.write_text(json.dumps(info, indent=2))
    log(f"done: validation exact match {val_acc} (chance 0.25); checkpoint in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fnabench.models.offline.llava_shapes_training [--out DIR] [--threads N] [--steps N]``."""
    parser = argparse.ArgumentParser(description="train the offline LLaVA-on-DINOv2-S VQA model (CPU, minutes)")
    parser.add_argument("--out", help="checkpoint folder (default: the cache folder of the config)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--train-scenes", type=int, default=TrainConfig.train_scenes)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(steps=args.steps, train_scenes=args.train_scenes)
    print(train(args.out, config, log=lambda m: print(m, flush=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
