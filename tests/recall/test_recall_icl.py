"""First/second-token ICL task: prompts, whitespace skipping, known accuracies, a checkpoint sweep, the plot."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fnabench.tasks.recall.config import ConfigError
from fnabench.tasks.recall.icl import (
    build_prompt,
    checkpoint_step,
    first_second_accuracy,
    load_task,
    scoring_positions,
    sweep,
)

transformers = pytest.importorskip("transformers")


class CharTokenizer:
    """One token per character; id 0 is a BOS added with special tokens."""

    def __init__(self, alphabet: str) -> None:
        self.chars = ["<s>", *sorted(set(alphabet))]
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [self.ids[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids if i)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class CopyPrevious(nn.Module):
    """An oracle LM whose greedy next token is always the current token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return _Out(torch.nn.functional.one_hot(ids, self.vocab).float())


@pytest.fixture
def task_file(tmp_path):
    # targets start with a space (a whitespace-only token, given as context) and then repeat a letter twice:
    # a copy-the-current-token model misses every first letter (it copies ':' or ' ') and gets every second one
    examples = [{"input": w, "target": f" {c}{c}x"} for w, c in [("one", "a"), ("two", "b"), ("six", "c"),
                                                                   ("ten", "d")]]
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"task_prefix": "Repeat.", "example_input_prefix": "\nIn: ",
                                "example_output_prefix": "\nOut:", "examples": examples}))
    return path


def _tokenizer(path):
    task = load_task(path)
    text = task.prefix + task.input_prefix + task.output_prefix + "".join(x + y for x, y in task.examples)
    return task, CharTokenizer(text)


def test_prompt_and_scoring_positions(task_file):
    task, tok = _tokenizer(task_file)
    prompt = build_prompt(task, 0, shots=1)
    assert prompt == "Repeat.\nIn: two\nOut: bbx\nIn: one\nOut:"
    ids, positions = scoring_positions(tok, prompt, " aax")
    n = len(tok.encode(prompt))
    assert positions == [n + 1, n + 2]  # the leading space token is skipped
    assert tok.decode([ids[positions[0]]]) == "a" and tok.decode([ids[positions[1]]]) == "a"


def test_known_accuracies_with_an_oracle(task_file):
    task, tok = _tokenizer(task_file)
    result = first_second_accuracy(CopyPrevious(len(tok.chars)), tok, task, shots=2)
    assert result == {"first_accuracy": 0.0, "second_accuracy": 1.0, "n_first": 4, "n_second": 4}
    assert first_second_accuracy(CopyPrevious(len(tok.chars)), tok, task, max_examples=2)["n_first"] == 2


def test_sweep_over_tiny_random_gpt2_checkpoints(task_file, tmp_path):
    task, tok = _tokenizer(task_file)
    dirs = []
    for step in (0, 500):
        torch.manual_seed(step)
        config = transformers.GPT2Config(vocab_size=len(tok.chars), n_positions=128, n_embd=16, n_layer=1, n_head=2)
        path = tmp_path / f"step{step}-tokens0B"
        transformers.GPT2LMHeadModel(config).save_pretrained(path)
        dirs.append(str(path))
    rows = sweep(dirs, task, tokenizer=tok)
    assert [r["step"] for r in rows] == [0, 500]
    for row in rows:
        assert 0.0 <= row["first_accuracy"] <= 1.0 and 0.0 <= row["second_accuracy"] <= 1.0
        assert row["n_first"] == row["n_second"] == 4
    pytest.importorskip("matplotlib")
    from fnabench.tasks.recall.plots import plot_icl

    assert plot_icl(rows, tmp_path / "icl.png").stat().st_size > 5_000


def test_step_parsing_and_bad_task_files(tmp_path):
    assert checkpoint_step("allenai/OLMo-7B@step1000-tokens4B", 7) == 1000
    assert checkpoint_step("/ckpt/step_250", 7) == 250 and checkpoint_step("/ckpt/final", 7) == 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"examples": [{"input": "a"}]}))
    with pytest.raises(ConfigError, match="needs a string 'input' and a 'target'"):
        load_task(bad)
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_task(bad)
    scored = tmp_path / "scored.json"
    scored.write_text(json.dumps({"examples": [{"input": "a", "target_scores": {"x": 0, "y": 1}},
                                               {"input": "b", "target": ["z", "w"]}]}))
    assert load_task(scored).examples == [("a", "y"), ("b", "z")]
    with pytest.raises(ConfigError, match="cannot load checkpoint"):
        sweep([str(tmp_path / "no-such-model")], load_task(scored))
