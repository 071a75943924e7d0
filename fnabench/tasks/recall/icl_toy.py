"""A tiny causal LM with real checkpoints for the first- vs second-token ICL sweep, trained here in seconds.

The paper's OLMo experiment (``recall icl``) needs a model's pretraining checkpoints. Offline, this module
makes some: a generated transliteration-style task — made-up English-like words written in an IPA-like
alphabet by a fixed grapheme → phoneme table (with a digraph) — mixed with a second task on the same
words (spelling them out), each pair announced by its own marker (``IPA:`` / ``Spelling:``), so the first
answer token needs the marker (the symbolic label) while later tokens can continue from the answer so far.
A character-level GPT-2 is trained on shuffled pairs and saved every N steps as an ordinary transformers
folder (model, tokenizer, and ``fnabench_checkpoint.json`` with its step and training tokens).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fnabench.tasks.recall.icl import CHECKPOINT_INFO
from fnabench.tasks.recall.run_config import ConfigError

#: grapheme → phoneme; "sh" is a digraph (one phoneme), vowels and some consonants change letter
PHONEMES = {"sh": "ʃ", "a": "æ", "e": "ɛ", "i": "ɪ", "o": "ɒ", "u": "ʌ", "b": "b", "d": "d", "g": "ɡ", "k": "k",
            "l": "l", "m": "m", "n": "n", "p": "p", "r": "ɹ", "s": "s", "t": "t", "y": "j", "j": "dʒ"}
CONSONANTS = ("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "y", "j", "sh")
VOWELS = ("a", "e", "i", "o", "u")
INPUT_PREFIX, IPA_PREFIX, SPELL_PREFIX = "\nEnglish: ", "\nIPA: ", "\nSpelling: "


def transliterate(word: str) -> str:
    """The word in the toy IPA: greedy left-to-right, digraphs first."""
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] in PHONEMES:
            out.append(PHONEMES[word[i:i + 2]])
            i += 2
        else:
            out.append(PHONEMES[word[i]])
            i += 1
    return "".join(out)


def spell(word: str) -> str:
    return "-".join(word)


def make_words(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct words of 2–3 consonant-vowel syllables."""
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.integers(2, 4)
        words.add("".join(CONSONANTS[rng.integers(len(CONSONANTS))] + VOWELS[rng.integers(len(VOWELS))]
                          for _ in range(syllables)))
    return sorted(words)


def alphabet() -> str:
    """Every character the task can produce (the tokenizer's vocabulary)."""
    text = INPUT_PREFIX + IPA_PREFIX + SPELL_PREFIX + "-" + "".join(PHONEMES) + "".join(PHONEMES.values())
    return "".join(sorted(set(text)))


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (one token per character; saved with the checkpoints)."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ModuleNotFoundError:
        raise ConfigError("the toy ICL model needs transformers: pip install 'fnabench[recall]'") from None
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(alphabet())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def write_task(words: list[str], path: str | Path) -> Path:
    """The evaluation task in BIG-bench JSON form: held-out words and their transliterations."""
    task = {"name": "toy_ipa_transliterate", "description": "made-up English-like words to a toy IPA",
            "example_input_prefix": INPUT_PREFIX, "example_output_prefix": IPA_PREFIX, "task_prefix": "",
            "examples": [{"input": w, "target": transliterate(w)} for w in words]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class ToySettings:
    """The toy LM, its data and its training; checkpoints at step 0 and every ``save_every`` steps."""

    steps: int = 400
    save_every: int = 50
    batch: int = 16
    context: int = 128
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    lr: float = 1e-2
    train_words: int = 400
    test_words: int = 64
    seed: int = 0


def _document(words: list[str], context: int, rng: np.random.Generator) -> str:
    text = ""
    while len(text) < context + 1:
        word = words[rng.integers(len(words))]
        answer = (IPA_PREFIX + transliterate(word)) if rng.random() < 0.5 else (SPELL_PREFIX + spell(word))
        text += INPUT_PREFIX + word + answer
    return text


def train_toy_lm(out: str | Path, settings: ToySettings = ToySettings(), progress: bool = False) -> list[Path]:
    """Train the toy LM into ``out`` (``stepN-tokensT/`` folders and ``task.json``, the held-out IPA task);
    returns the checkpoint folders in step order."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ModuleNotFoundError:
        raise ConfigError("the toy ICL model needs transformers: pip install 'fnabench[recall]'") from None
    if settings.steps < 1 or settings.save_every < 1:
        raise ConfigError("icl-train --steps and --save-every must be >= 1")
    out = Path(out)
    rng = np.random.default_rng(settings.seed)
    words = make_words(settings.train_words + settings.test_words, rng)
    order = rng.permutation(len(words))
    train_words = [words[i] for i in order[: settings.train_words]]
    write_task([words[i] for i in order[settings.train_words:]], out / "task.json")
    tokenizer = char_tokenizer()
    torch.manual_seed(settings.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(256, settings.context), n_embd=settings.n_embd,
                        n_layer=settings.n_layer, n_head=settings.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    saved = []
    tokens_per_step = settings.batch * settings.context
    began = time.perf_counter()

    def save(step: int) -> None:
        folder = out / f"step{step}-tokens{step * tokens_per_step}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / CHECKPOINT_INFO).write_text(json.dumps({"step": step, "tokens": step * tokens_per_step,
                                                          "settings": asdict(settings)}) + "\n")
        saved.append(folder)

    save(0)
    model.train()
    for step in range(1, settings.steps + 1):
        ids = [tokenizer.encode(_document(train_words, settings.context, rng))[: settings.context + 1]
               for _ in range(settings.batch)]
        batch = torch.tensor(ids)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if progress and step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
        if step % settings.save_every == 0 or step == settings.steps:
            save(step)
    return saved
