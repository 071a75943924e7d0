"""transformers families in the family contract (``fnabench.patching.families``): tiny random configs.

Decoders are ``*ForCausalLM`` models on 40 random token ids (output: logits); encoders give their last
hidden state on 8×8-patch 32-pixel images or 40 token ids. Every config is the family's own class with its
defaults, shrunk to 2 layers of width 32 (``_SMALL``) plus the overrides in its line.
"""

from __future__ import annotations

import torch

from fnabench.patching.families.family import Family

_SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
TOKENS = 40


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def _decoder_factory(config: str, model: str, overrides: dict):
    def make():
        import transformers

        cfg = getattr(transformers, config)(**{**_SMALL, **overrides})
        lm = getattr(transformers, model)(cfg).eval()
        return lm, _ids(cfg.vocab_size), lambda m, x: m(x).logits

    return make


def decoder(name: str, config: str, model: str, route: str = "interface", refused: str | None = None,
            note: str = "", live: bool = True, caches: tuple[str, ...] = ("full", "landmark"),
            **overrides) -> Family:
    """A causal LM family from its config and model class names and the overrides of its tiny config."""
    return Family(name, "transformers", "decoder", _decoder_factory(config, model, overrides), route, refused,
                  note, live, caches)


def _text_factory(config: str, model: str, overrides: dict, small: dict):
    def make():
        import transformers

        cfg = getattr(transformers, config)(**{**small, **overrides})
        enc = getattr(transformers, model)(cfg).eval()
        return enc, _ids(cfg.vocab_size), lambda m, x: m(input_ids=x).last_hidden_state

    return make


def _vision_factory(config: str, model: str, overrides: dict, small: dict):
    def make():
        import transformers

        cfg = getattr(transformers, config)(**{**small, **overrides})
        enc = getattr(transformers, model)(cfg).eval()
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return enc, images, lambda m, x: m(pixel_values=x).last_hidden_state

    return make


_ENC = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_TEXT = {**_ENC, "vocab_size": 96, "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1,
         "eos_token_id": 2}
_VISION = {**_ENC, "image_size": 32, "patch_size": 8}


def text_encoder(name: str, config: str, model: str, role: str = "encoder", route: str = "interface",
                 refused: str | None = None, note: str = "", live: bool = True, **overrides) -> Family:
    """A text encoder (bidirectional, or a causal text tower) on token ids."""
    return Family(name, "transformers", role, _text_factory(config, model, overrides, _TEXT), route, refused,
                  note, live)


def vision_encoder(name: str, config: str, model: str, route: str = "interface", refused: str | None = None,
                   note: str = "", live: bool = True, **overrides) -> Family:
    """A vision encoder on 32-pixel images."""
    return Family(name, "transformers", "encoder", _vision_factory(config, model, overrides, _VISION), route,
                  refused, note, live)


_SOFTCAP = "attention logit soft-capping"
FAMILIES = (
    decoder("llama", "LlamaConfig", "LlamaForCausalLM", note="grouped-query heads (4 query, 2 key/value)"),
    decoder("mistral", "MistralConfig", "MistralForCausalLM"),
    decoder("mistral (sliding_window=16)", "MistralConfig", "MistralForCausalLM", sliding_window=16, live=False,
            note="every layer's window binds at 40 tokens: every layer runs exact, and says so"),
    decoder("mixtral", "MixtralConfig", "MixtralForCausalLM", num_local_experts=2, num_experts_per_tok=1),
    decoder("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    decoder("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=2, num_experts_per_tok=1,
            moe_intermediate_size=32, shared_expert_intermediate_size=32),
    decoder("qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    decoder("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=8, num_experts=2, num_experts_per_tok=1,
            moe_intermediate_size=32),
    decoder("olmo", "OlmoConfig", "OlmoForCausalLM"),
    decoder("olmo2", "Olmo2Config", "Olmo2ForCausalLM", note="post-norm layers: attention yes, token flows refused"),
    decoder("olmoe", "OlmoeConfig", "OlmoeForCausalLM", num_experts=2, num_experts_per_tok=1),
    decoder("gemma", "GemmaConfig", "GemmaForCausalLM", head_dim=8),
    decoder("gemma2", "Gemma2Config", "Gemma2ForCausalLM", route="refused", refused=_SOFTCAP, head_dim=8,
            note="exact runs it (an eager soft-capped softmax); FNA does not soft-cap its landmark blocks"),
    decoder("gemma2 (attn_logit_softcapping=None)", "Gemma2Config", "Gemma2ForCausalLM", head_dim=8,
            attn_logit_softcapping=None, note="alternating sliding/global layers, the windows not binding"),
    decoder("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8),
    decoder("gemma3 (sliding_window=16)", "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            note="the windowed layer runs exact (its window binds), the global layer runs FNA"),
    decoder("phi3", "Phi3Config", "Phi3ForCausalLM", pad_token_id=0),
    decoder("phi", "PhiConfig", "PhiForCausalLM", note="partial rotary, parallel attention and MLP"),
    decoder("granite", "GraniteConfig", "GraniteForCausalLM", note="scaled residuals: token flows refused"),
    decoder("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", note="parallel residual"),
    decoder("stablelm", "StableLmConfig", "StableLmForCausalLM"),
    decoder("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", note="no rotary in every 4th layer"),
    decoder("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", sliding_window=None),
    decoder("cohere", "CohereConfig", "CohereForCausalLM", note="parallel attention and MLP"),
    decoder("gpt2", "GPT2Config", "GPT2LMHeadModel"),
    decoder("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=True,
            note="multi-query attention (one key/value head)"),
    decoder("gptj", "GPTJConfig", "GPTJForCausalLM", rotary_dim=4),
    decoder("codegen", "CodeGenConfig", "CodeGenForCausalLM", rotary_dim=4, n_ctx=128),
    decoder("opt", "OPTConfig", "OPTForCausalLM", ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0),
    decoder("biogpt", "BioGptConfig", "BioGptForCausalLM"),
    decoder("falcon", "FalconConfig", "FalconForCausalLM", num_kv_heads=2, new_decoder_architecture=True),
    decoder("falcon (alibi)", "FalconConfig", "FalconForCausalLM", alibi=True, route="refused",
            refused="ALiBi", note="ALiBi arrives as a graded float mask: exact honours it, FNA refuses it"),
    decoder("helium", "HeliumConfig", "HeliumForCausalLM", head_dim=8),
    decoder("glm", "GlmConfig", "GlmForCausalLM", head_dim=8),
    decoder("nemotron", "NemotronConfig", "NemotronForCausalLM", head_dim=8),
    decoder("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, q_lora_rank=16,
            kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=2,
            num_experts_per_tok=1, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
            caches=("full",), note="multi-head latent attention (q/k heads of 12, v heads of 6); it caches a "
            "compressed latent, so cache=landmark is refused"),
    decoder("gpt_oss", "GptOssConfig", "GptOssForCausalLM", route="refused", refused="attention sinks",
            head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=64,
            note="exact folds the sinks into its softmax; FNA does not"),
    decoder("gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM", route="refused", refused="computes attention itself",
            num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
    decoder("bloom", "BloomConfig", "BloomForCausalLM", route="refused", refused="computes attention itself"),
    text_encoder("bert", "BertConfig", "BertModel"),
    text_encoder("roberta", "RobertaConfig", "RobertaModel", pad_token_id=0),
    text_encoder("electra", "ElectraConfig", "ElectraModel", embedding_size=32),
    text_encoder("modernbert", "ModernBertConfig", "ModernBertModel", global_attn_every_n_layers=2,
                 local_attention=16, pad_token_id=0,
                 note="local layers run exact where their window binds, global layers FNA"),
    text_encoder("clip text", "CLIPTextConfig", "CLIPTextModel", role="causal encoder", eos_token_id=2),
    text_encoder("siglip text", "SiglipTextConfig", "SiglipTextModel", max_position_embeddings=64),
    vision_encoder("clip vision", "CLIPVisionConfig", "CLIPVisionModel"),
    vision_encoder("siglip vision", "SiglipVisionConfig", "SiglipVisionModel"),
    vision_encoder("dinov2", "Dinov2Config", "Dinov2Model"),
    vision_encoder("dinov2_with_registers", "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                   num_register_tokens=4),
    vision_encoder("vit", "ViTConfig", "ViTModel"),
    vision_encoder("deit", "DeiTConfig", "DeiTModel"),
)
