"""The offline VQA data and training format: scenes answer their questions, the shipped lmms-eval task file is
what the generator makes, training sequences are exactly what the model sees at inference."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from fnabench.data.generated import vqa as sc
from fnabench.models.offline import llava_shapes_training as tr
from fnabench.models.offline.llava_shapes_arch import IMAGE, TINY, build_model, build_processor
from fnabench.tasks.lmms_tasks import DATA


def test_scenes_are_seeded_and_their_answers_are_drawn():
    """Each colour answer is the colour at that object's centre; each position answer holds its centre."""
    a, b = sc.scenes(12, seed=3), sc.scenes(12, seed=3)
    assert a == b and a != sc.scenes(12, seed=4)
    px = 168
    for scene in a:
        image = np.asarray(scene.image(px))
        for thing in scene.things:
            centre = image[int(thing.cy * px), int(thing.cx * px)]
            assert tuple(centre) == sc.COLOURS[thing.colour]
            row, col = int(thing.cy > 0.5), int(thing.cx > 0.5)
            assert sc.QUADRANTS[2 * row + col] == thing.quadrant
        asked = {q.kind: q for q in scene.questions()}
        assert asked["count"].answer == sc.COUNTS[len(scene.things) - 1]
        assert len({t.shape for t in scene.things}) == len({t.colour for t in scene.things}) == len(scene.things)


def test_the_shipped_task_file_is_the_generators_and_balanced():
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert docs == json.loads(json.dumps(sc.test_docs()))  # regenerate with fnabench.tasks.lmms_tasks.write_data
    per = Counter((d["kind"], d["answer"]) for d in docs)
    assert len(docs) == 200 and all(12 <= n <= 13 for n in per.values()) and len(per) == 16
    assert [d["kind"] for d in docs[:4]] == list(sc.KINDS)  # interleaved: any --limit sees every kind
    scene = sc.scene_from_dict(docs[0]["scene"])
    assert docs[0]["answer"] in {q.answer for q in scene.questions() if q.text == docs[0]["question"]}


def test_training_prompts_are_the_processors():
    """The trainer's token ids for a question are what LlavaProcessor makes of the chat template."""
    processor = build_processor(TINY)
    scene = sc.scenes(1, seed=0)[0]
    question = scene.questions()[0]
    ids, target = tr.encode(processor.tokenizer, question.text, question.answer, TINY.image_tokens)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.text}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == tr.prompt_text(question.text)
    got = processor(images=scene.image(TINY.image_size), text=text, return_tensors="pt").input_ids[0].tolist()
    assert got == ids and ids.count(IMAGE) == TINY.image_tokens
    assert processor.tokenizer.decode(target[:-1]) == question.answer


def test_a_packed_scene_gives_each_question_the_logits_it_gets_alone():
    """The block mask and restarted positions make every packed segment the sequence inference sees."""
    torch.manual_seed(0)
    model = build_model(TINY, tiny_tower=True)
    tokenizer = build_processor(TINY).tokenizer
    scene = sc.scenes(4, seed=1)[3]  # four objects: 13 questions in one sequence
    feats = torch.randn(1, TINY.image_tokens, model.config.vision_config.hidden_size)
    packed = tr.pack(tokenizer, scene, 0, TINY.image_tokens)
    batch = tr.collate([packed, tr.pack(tokenizer, sc.scenes(1, seed=2)[0], 0, TINY.image_tokens)])
    with torch.no_grad():
        logits = tr.forward_logits(model, batch, feats)[0]
        for j, q in enumerate(scene.questions(), start=1):
            prompt, target = tr.encode(tokenizer, q.text, q.answer, TINY.image_tokens)
            alone = tr.collate([tr.Packed(prompt + target, [-100] * len(prompt) + target,
                                          list(range(len(prompt) + len(target))), [0] * (len(prompt) + len(target)),
                                          0)])
            want = tr.forward_logits(model, alone, feats)[0, -len(target) - 1:]
            where = [i for i, s in enumerate(packed.segment) if s == j]
            got = logits[where][-len(target) - 1:]
            assert (got - want).abs().max() < 1e-4
    assert sum(1 for label in packed.labels if label != -100) == sum(
        len(tr.encode(tokenizer, q.text, q.answer, 1)[1]) for q in scene.questions())
