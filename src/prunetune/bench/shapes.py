"""Randomly initialised models of named shapes, for benchmarks: only shapes matter for time and
memory, so nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

# LlamaConfig keyword arguments of each named shape.
SHAPES: dict[str, dict] = {
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000, max_position_embeddings=2048,
                     tie_word_embeddings=False),
    "llama-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                      intermediate_size=13824, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                      tie_word_embeddings=False),
    "llama-65b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64,
                      intermediate_size=22016, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False),
    "llama2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "llama2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "llama3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=False),
    "llama3.1-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1000, max_position_embeddings=2048, tie_word_embeddings=False),
}


def shape_config(shape: str, seq_len: int = 0, **overrides):
    """The config of a named shape (Llama unless the shape names another model type), with at least
    `seq_len` positions."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise UserError(f"unknown shape '{shape}'; available: {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape]) | overrides
    kwargs["max_position_embeddings"] = max(kwargs["max_position_embeddings"], seq_len)
    return AutoConfig.for_model(kwargs.pop("model_type", "llama"), **kwargs)


def random_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A model of `config` with random weights, built in place on `device` (no fp32 copy on the CPU first)."""
    from transformers import AutoModelForCausalLM

    from ..families import prepare

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return prepare(model).eval()


def placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer with `vocab_size` tokens (`<unk>`, `<s>`, `</s>`, `t3`, `t4`, ...).

    It makes a random model's directory loadable by `prunetune.load_model` and `prunetune prune`,
    which save and load a tokenizer with every model; it is not meant for real text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def save_random_model(config, out_dir: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      device: torch.device | None = None) -> Path:
    """Write a random model of `config` (built on `device`, default the CPU) and a placeholder tokenizer."""
    out_dir = Path(out_dir)
    model = random_model(config, device or torch.device("cpu"), dtype, seed)
    model.save_pretrained(out_dir)
    del model
    placeholder_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir
