"""The first- vs second-token ICL task for checkpointed causal LMs (the paper's OLMo experiment).

For a BIG-bench-format task (``examples`` of ``input``/``target``), each query is prompted with
``shots`` worked pairs before it. First-token accuracy: greedy top-1 on the first target token.
Second-token accuracy: top-1 on the second target token with the true first one given. Whitespace-only
target tokens are given as context and skipped. Swept over a model's checkpoint revisions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.run_config import ConfigError

_STEP = re.compile(r"step[_-]?(\d+)")


@dataclass
class IclTask:
    """A BIG-bench-style task: prefix, (input, target) pairs and the strings put before inputs and targets."""

    examples: list[tuple[str, str]]
    prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "


def load_task(path: str | Path, input_prefix: str | None = None, output_prefix: str | None = None) -> IclTask:
    """Read a BIG-bench JSON (``target`` a string or list, or ``target_scores``: the best-scored one)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"task file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    examples = []
    for i, ex in enumerate(raw.get("examples", []) if isinstance(raw, dict) else []):
        target = ex.get("target")
        if target is None and isinstance(ex.get("target_scores"), dict) and ex["target_scores"]:
            target = max(ex["target_scores"], key=ex["target_scores"].get)
        if isinstance(target, list):
            target = target[0] if target else None
        if not isinstance(ex.get("input"), str) or not isinstance(target, str):
            raise ConfigError(f"{path}: example {i} needs a string 'input' and a 'target'")
        examples.append((ex["input"], target))
    if len(examples) < 2:
        raise ConfigError(f"{path}: needs an 'examples' list with at least 2 input/target pairs")
    return IclTask(
        examples, raw.get("task_prefix", ""),
        raw.get("example_input_prefix", "\nQ: ") if input_prefix is None else input_prefix,
        raw.get("example_output_prefix", "\nA: ") if output_prefix is None else output_prefix,
    )


def build_prompt(task: IclTask, index: int, shots: int = 1) -> str:
    """The prompt for example ``index``: the next ``shots`` examples (cyclically) as worked pairs, then its input."""
    n = len(task.examples)
    demos = [task.examples[(index + j) % n] for j in range(1, shots + 1)]
    text = task.prefix + "".join(f"{task.input_prefix}{x}{task.output_prefix}{y}" for x, y in demos)
    return text + f"{task.input_prefix}{task.examples[index][0]}{task.output_prefix}"


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def scoring_positions(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target, and the indices in it of the first and second non-whitespace target tokens."""
    context = _encode(tokenizer, prompt, True)
    answer = _encode(tokenizer, target, False)
    visible = [j for j, tok in enumerate(answer) if tokenizer.decode([tok]).strip()]
    return context + answer, [len(context) + j for j in visible[:2]]


@torch.inference_mode()
def first_second_accuracy(model, tokenizer, task: IclTask, shots: int = 1, max_examples: int | None = None,
                          device: str = "cpu") -> dict:
    """Greedy top-1 accuracy on the first and (true first given) second target token over the task's examples."""
    hits = {"first": 0, "second": 0}
    counts = {"first": 0, "second": 0}
    count = len(task.examples) if max_examples is None else min(max_examples, len(task.examples))
    for i in range(count):
        ids, positions = scoring_positions(tokenizer, build_prompt(task, i, shots), task.examples[i][1])
        if not positions:
            continue
        logits = model(torch.tensor([ids[: positions[-1] + 1]], device=device)).logits[0]
        for name, pos in zip(("first", "second"), positions, strict=False):
            counts[name] += 1
            hits[name] += int(int(logits[pos - 1].argmax()) == ids[pos])
    return {
        "first_accuracy": hits["first"] / counts["first"] if counts["first"] else float("nan"),
        "second_accuracy": hits["second"] / counts["second"] if counts["second"] else float("nan"),
        "n_first": counts["first"], "n_second": counts["second"],
    }


def checkpoint_step(name: str, default: int) -> int:
    """The training step in a revision or directory name (``step1000-tokens4B`` → 1000), else ``default``."""
    match = _STEP.search(Path(name).name if "@" not in name else name.split("@", 1)[1])
    return int(match.group(1)) if match else default


_TOKENS = re.compile(r"tokens(\d+(?:\.\d+)?)([KMBT]?)", re.IGNORECASE)
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
#: written by :func:`fnabench.tasks.recall.icl_toy.train_toy_lm` into each checkpoint folder
CHECKPOINT_INFO = "fnabench_checkpoint.json"


def checkpoint_tokens(checkpoint: str) -> int | None:
    """Training tokens seen by a checkpoint: a local folder's ``fnabench_checkpoint.json``, else the revision
    or folder name's ``tokensNB`` (OLMo: ``step1000-tokens4B`` → 4e9); None when neither says."""
    info = Path(checkpoint) / CHECKPOINT_INFO
    if info.is_file():
        with open(info) as f:
            tokens = json.load(f).get("tokens")
        if tokens is not None:
            return int(tokens)
    name = checkpoint.split("@", 1)[1] if "@" in checkpoint and not Path(checkpoint).exists() else Path(checkpoint).name
    match = _TOKENS.search(name)
    return int(float(match.group(1)) * _SCALE[match.group(2).upper()]) if match else None


def _split(checkpoint: str) -> tuple[str, str | None]:
    if "@" in checkpoint and not Path(checkpoint).exists():
        model_id, revision = checkpoint.split("@", 1)
        return model_id, revision
    return checkpoint, None


def _hf():
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ModuleNotFoundError:
        raise ConfigError("the ICL task needs transformers: pip install 'fnabench[recall]'") from None
    return AutoModelForCausalLM, AutoTokenizer


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(checkpoint: str, *, device: str = "cpu", dtype: str = "float32", cache_dir: str | None = None):
    """A causal LM from a local folder or ``hub_id@revision``, through transformers' own download cache."""
    auto_model, _ = _hf()
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    model_id, revision = _split(checkpoint)
    import transformers

    major_minor = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    precision = {"dtype" if major_minor >= (4, 56) else "torch_dtype": _DTYPES[dtype]}  # renamed in 4.56
    try:
        model = auto_model.from_pretrained(model_id, revision=revision, cache_dir=cache_dir, **precision)
    except (OSError, ValueError) as exc:  # missing files, unknown revision, no network
        raise ConfigError(f"cannot load checkpoint {checkpoint!r}: {_first_line(exc)}") from None
    return model.to(device).eval()


def load_tokenizer(checkpoint: str, cache_dir: str | None = None):
    _, auto_tokenizer = _hf()
    model_id, revision = _split(checkpoint)
    try:
        return auto_tokenizer.from_pretrained(model_id, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {checkpoint!r}: {_first_line(exc)}") from None


def record_name(checkpoint: str) -> str:
    """A file name for one checkpoint's record: its revision, or its folder name, made safe."""
    model_id, revision = _split(checkpoint)
    name = revision or Path(model_id).name or "checkpoint"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".json"


def evict_revision(model_id: str, commit: str | None, cache_dir: str | None = None) -> bool:
    """Delete one downloaded revision of a hub model from the transformers (huggingface_hub) cache, so a sweep
    over hundreds of multi-GB checkpoints keeps one on disk at a time; False when it is not there."""
    if not commit:
        return False
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except Exception:  # no cache folder yet
        return False
    hashes = [rev.commit_hash for repo in info.repos if repo.repo_id == model_id for rev in repo.revisions
              if rev.commit_hash == commit]
    if not hashes:
        return False
    info.delete_revisions(*hashes).execute()
    return True


def sweep(checkpoints: Sequence[str], task: IclTask, *, tokenizer=None, shots: int = 1,
          max_examples: int | None = None, device: str = "cpu", dtype: str = "float32",
          cache_dir: str | None = None, out: str | Path | None = None, refresh: bool = False,
          evict: bool = False, progress=None) -> list[dict]:
    """Accuracies for every checkpoint (a local directory or ``hub_id@revision``) with its step and training
    tokens. With ``out``, one record per checkpoint is written to ``out/revisions/`` as it is measured, and
    checkpoints that already have one are read back, not loaded: an interrupted sweep resumes. ``evict``
    deletes each hub revision from the download cache once its record is written."""
    rows = []
    for index, checkpoint in enumerate(checkpoints):
        path = Path(out) / "revisions" / record_name(checkpoint) if out is not None else None
        if path is not None and path.is_file() and not refresh:
            row = rundir.read_json(path)
            if row.get("checkpoint") == checkpoint and row.get("shots") == shots \
                    and row.get("max_examples") == max_examples:
                rows.append(row)
                continue
        model = load_checkpoint(checkpoint, device=device, dtype=dtype, cache_dir=cache_dir)
        if tokenizer is None:
            tokenizer = load_tokenizer(checkpoint, cache_dir)
        result = first_second_accuracy(model, tokenizer, task, shots, max_examples, device)
        commit = getattr(model.config, "_commit_hash", None)
        del model
        row = {"checkpoint": checkpoint, "step": checkpoint_step(checkpoint, index),
               "tokens": checkpoint_tokens(checkpoint), "shots": shots, "max_examples": max_examples,
               "commit": commit, **result}
        if path is not None:
            rundir.write_json(path, row)
        model_id, revision = _split(checkpoint)
        if evict and revision is not None:
            evict_revision(model_id, commit, cache_dir)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def hub_step_revisions(model_id: str, every: int = 1) -> list[str]:
    """Every ``step*`` branch of a Hugging Face model repo (OLMo's intermediate checkpoints), in step order;
    ``every`` > 1 keeps every n-th one and the last."""
    try:
        from huggingface_hub import list_repo_refs
    except ModuleNotFoundError:
        raise ConfigError("listing hub revisions needs huggingface_hub: pip install 'fnabench[hf]'") from None
    try:
        refs = list_repo_refs(model_id)
    except Exception as exc:  # offline, unknown repo, gated: one line, not a traceback
        raise ConfigError(f"cannot list the revisions of {model_id!r} on the hub: {_first_line(exc)}") from None
    branches = sorted((b.name for b in refs.branches if _STEP.search(b.name)),
                      key=lambda b: int(_STEP.search(b).group(1)))
    if every > 1 and branches:
        branches = [b for i, b in enumerate(branches) if i % every == 0 or i == len(branches) - 1]
    return [f"{model_id}@{b}" for b in branches]
