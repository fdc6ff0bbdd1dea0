"""SmolLM3: Llama's layout with rotary embeddings switched off in every fourth layer; which layers
those are is a per-layer config list (`no_rope_layers`), cut with the layers."""

from .base import Family

SMOLLM3 = Family("SmolLM3", ("smollm3",), layer_lists=("layer_types", "no_rope_layers"))
