"""Phi-3 (and Phi-4-mini): Llama's units in fused projections, `qkv_proj` (query, key and value rows one
after the other) and `gate_up_proj` (gate rows, then up rows). prunetune splits them into the seven
projections when it loads the model and fuses them again when it writes it. Phi-3's attention reads
the number of query heads from the config, so every layer must keep the same shape."""

from torch import nn

from .base import Family


class Phi3Family(Family):
    def fused_widths(self, layer: nn.Module, path: str, module: nn.Module) -> list[int]:
        if path == "mlp.gate_up_proj":
            return super().fused_widths(layer, path, module)
        attn = layer.self_attn
        kv = attn.num_key_value_heads * attn.head_dim
        return [module.out_features - 2 * kv, kv, kv]


PHI3 = Phi3Family(
    "Phi-3", ("phi3",),
    projections={"q_proj": "self_attn.qkv_proj.q_proj", "k_proj": "self_attn.qkv_proj.k_proj",
                 "v_proj": "self_attn.qkv_proj.v_proj", "o_proj": "self_attn.o_proj",
                 "gate_proj": "mlp.gate_up_proj.gate_proj", "up_proj": "mlp.gate_up_proj.up_proj",
                 "down_proj": "mlp.down_proj"},
    fused={"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")},
    uniform_only="its attention reads the number of query heads from the config, shared by every layer",
)
