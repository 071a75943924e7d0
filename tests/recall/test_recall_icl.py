"""First/second-token ICL task: prompts, whitespace skipping, known accuracies, a checkpoint sweep, the plot."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fnabench.tasks.recall.icl import (
    build_prompt,
    checkpoint_step,
    first_second_accuracy,
    load_task,
    scoring_positions,
    sweep,
)
from fnabench.tasks.recall.run_config import ConfigError

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


@pytest.mark.slow
def test_icl_over_local_toy_checkpoints_gives_first_and_second_token_curves(tmp_path, capsys):
    """The offline OLMo experiment: a toy transliteration LM trained here, saved every 50 steps, swept by the same
    command a hub model's revisions go through; the curves are learned, not random; the sweep resumes."""
    pytest.importorskip("matplotlib")
    from fnabench.cli.main import main
    from fnabench.tasks.recall.icl_toy import ToySettings, train_toy_lm, transliterate

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folders = train_toy_lm(tmp_path / "toy", ToySettings(steps=200, save_every=50, context=96, n_embd=48))
        assert [f.name for f in folders] == [f"step{s}-tokens{s * 16 * 96}" for s in (0, 50, 100, 150, 200)]
        assert transliterate("shaja") == "ʃædʒæ"
        out = tmp_path / "icl"
        args = ["recall", "icl", *map(str, folders), "--task", str(tmp_path / "toy" / "task.json"), "--out", str(out),
                "--quiet"]
        assert main(args) == 0
    finally:
        torch.set_num_threads(previous)
    rows = json.loads((out / "icl.json").read_text())
    assert [r["tokens"] for r in rows] == [s * 16 * 96 for s in (0, 50, 100, 150, 200)]
    assert all(r["n_first"] == r["n_second"] == 64 for r in rows)
    first, second = ([r[f"{k}_accuracy"] for r in rows] for k in ("first", "second"))
    assert first[-1] >= first[0] + 0.08 and second[-1] >= second[0] + 0.08  # learned, not chance
    assert max(second) > 0.15
    assert f"step 200, {200 * 16 * 96:,} tokens: first" in capsys.readouterr().out
    assert len(list((out / "revisions").glob("*.json"))) == 5 and (out / "icl.png").stat().st_size > 5_000
    # resumable: a checkpoint with a record is not loaded again (its weights may be gone) ...
    (folders[-1] / "model.safetensors").unlink()
    assert main(args) == 0 and json.loads((out / "icl.json").read_text()) == rows
    # ... unless asked to measure again
    assert main([*args, "--refresh"]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err


def test_training_tokens_from_names_and_checkpoint_info(tmp_path):
    from fnabench.tasks.recall.icl import CHECKPOINT_INFO, checkpoint_tokens, record_name

    assert checkpoint_tokens("allenai/OLMo-7B-hf@step1000-tokens4B") == 4_000_000_000
    assert checkpoint_tokens("allenai/OLMo-1B-hf@step20000-tokens84B") == 84_000_000_000
    assert checkpoint_tokens("allenai/OLMo-1B-hf@main") is None
    folder = tmp_path / "step7"
    folder.mkdir()
    (folder / CHECKPOINT_INFO).write_text(json.dumps({"step": 7, "tokens": 1234}))
    assert checkpoint_tokens(str(folder)) == 1234 and checkpoint_step(str(folder), 0) == 7
    assert record_name("allenai/OLMo-7B-hf@step1000-tokens4B") == "step1000-tokens4B.json"


def test_hub_revisions_are_listed_in_step_order_and_errors_are_one_line(monkeypatch):
    import huggingface_hub

    from fnabench.tasks.recall.icl import hub_step_revisions

    names = ("main", "step2000-tokens8B", "step1000-tokens4B", "step3000-tokens12B", "step500-tokens2B")
    refs = SimpleNamespace(branches=[SimpleNamespace(name=n) for n in names])
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda model_id: refs)
    assert hub_step_revisions("org/m") == [f"org/m@step{s}-tokens{t}B" for s, t in
                                           ((500, 2), (1000, 4), (2000, 8), (3000, 12))]
    assert hub_step_revisions("org/m", every=3) == ["org/m@step500-tokens2B", "org/m@step3000-tokens12B"]

    def offline(model_id):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")

    monkeypatch.setattr(huggingface_hub, "list_repo_refs", offline)
    with pytest.raises(ConfigError, match=r"cannot list the revisions of 'org/m' on the hub: We couldn't connect"):
        hub_step_revisions("org/m")


def test_evict_deletes_only_the_measured_revision(monkeypatch):
    import huggingface_hub

    from fnabench.tasks.recall.icl import evict_revision

    deleted = []

    class Strategy:
        def __init__(self, hashes):
            self.hashes = hashes

        def execute(self):
            deleted.extend(self.hashes)

    revisions = [SimpleNamespace(commit_hash=h) for h in "ab"]
    info = SimpleNamespace(repos=[SimpleNamespace(repo_id="org/m", revisions=revisions)],
                           delete_revisions=lambda *hashes: Strategy(hashes))
    monkeypatch.setattr(huggingface_hub, "scan_cache_dir", lambda cache_dir=None: info)
    assert evict_revision("org/m", "b") and deleted == ["b"]
    assert not evict_revision("org/m", "c") and not evict_revision("org/other", "a")
    assert not evict_revision("org/m", None)


def test_icl_config_file_and_bad_keys(tmp_path, capsys):
    from fnabench.cli import recall_cmd as cli

    config = tmp_path / "icl.toml"
    config.write_text('[icl]\nmodel = "org/m"\ntask = "t.json"\nbatchsize = 3\n')
    assert cli.main(["icl", "--config", str(config)]) == 2
    assert "unknown [icl] key(s) batchsize" in capsys.readouterr().err
    config.write_text('[icl]\ntask = "t.json"\n')
    assert cli.main(["icl", "--config", str(config)]) == 2
    assert "icl needs --out" in capsys.readouterr().err
