"""The offline VQA model's architecture: LLaVA (transformers' ``LlavaForConditionalGeneration``) with the real
DINOv2-S as its vision tower, a two-layer projector and a small Llama, plus a word-level tokenizer and a
``LlavaProcessor`` with a LLaVA-1.5-style chat template ("USER: <image>\\n… ASSISTANT:").

Saved with ``save_pretrained``, the folder is an ordinary transformers checkpoint:
``LlavaForConditionalGeneration.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)`` load it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fnabench._extras import require
from fnabench.data.generated import vqa as scenes
from fnabench.models.offline import dinov2_s as dinov2_onnx

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD, BOS, EOS, UNK, IMAGE = range(len(SPECIALS))
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Architecture:
    """The sizes that define the model (its hash names the cached checkpoint)."""

    image_size: int = 168  # 12 × 12 = 144 patch tokens of DINOv2-S/14
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    feature_layer: int = -2  # as LLaVA: the patch tokens of the second-to-last vision block

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // 14) ** 2


def vocabulary() -> list[str]:
    """Every word the templates and answers use, after the special tokens."""
    words = {"user", "assistant", ":", "?"}
    for scene in scenes.scenes(64, seed=12345):
        for q in scene.questions():
            words.update(q.text.replace("?", " ?").split())
            words.update(q.answer.split())
    for kind in scenes.ANSWERS.values():
        for answer in kind:
            words.update(answer.split())
    return [*SPECIALS, *sorted(words)]


def build_tokenizer():
    """A word-level fast tokenizer (lower-cased, split on whitespace and punctuation) over :func:`vocabulary`."""
    tr = require("transformers")
    tk = require("tokenizers")
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tk.normalizers.Lowercase()
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.decoder = tk.decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return tr.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                      padding_side="left")


def build_processor(arch: Architecture):
    """``LlavaProcessor``: the tokenizer, a resize-only image processor (ImageNet statistics), the chat template."""
    tr = require("transformers")
    size = arch.image_size
    images = tr.BitImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    return tr.LlavaProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=14,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=CHAT_TEMPLATE)


def build_model(arch: Architecture, seed: int = 0, *, tiny_tower: bool = False):
    """The LLaVA model: offline:dinov2-s's weights in the tower, projector and language model seeded-random.

    ``tiny_tower`` puts a small random-initialised DINOv2 in the tower instead (wiring tests: no weights).
    """
    tr = require("transformers")
    if tiny_tower:
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            tower = tr.Dinov2Model(tr.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                   mlp_ratio=2, patch_size=14, image_size=arch.image_size))
    else:
        tower = dinov2_onnx.build_hf(dinov2_onnx.exported_state_dict(str(dinov2_onnx.onnx_path())))
    text = tr.LlamaConfig(vocab_size=len(vocabulary()), hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                          num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                          num_key_value_heads=arch.kv_heads, max_position_embeddings=512, bos_token_id=BOS,
                          eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)
    config = tr.LlavaConfig(vision_config=tower.config.to_dict() | {"model_type": "dinov2"}, text_config=text,
                            image_token_id=IMAGE, vision_feature_layer=arch.feature_layer,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu",
                            tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tr.LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())  # tie_word_embeddings: lm_head is the embedding
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    return model.eval()


TINY = Architecture(image_size=56, hidden=32, layers=3, heads=2, kv_heads=1, intermediate=64)


def save_tiny(folder, seed: int = 0):
    """A random tiny LLaVA (4×4 image tokens, 3 vision and 3 language blocks) saved as a checkpoint folder."""
    model = build_model(TINY, seed, tiny_tower=True)
    model.save_pretrained(folder)
    build_processor(TINY).save_pretrained(folder)
    return folder
