"""Mixture-of-experts families: Mixtral, Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE.

Their attention is Llama's (PhiMoE adds biases and LayerNorms, GraniteMoE Granite's multipliers)
(OLMoE adds OLMo 2's q/k norms over the whole projection, sized by the hidden size in stock
transformers, so OLMoE's heads stay; Qwen3-MoE adds Qwen3's per-head norms); their feed-forward is a
router (`mlp.gate`, one weight row per expert) and
the experts stored as two 3-D parameters (`mlp.experts.gate_up_proj` [experts, 2 x width, hidden],
gate rows then up rows, and `mlp.experts.down_proj` [experts, hidden, width]). Two unit kinds live
there: a whole expert (its slices of both parameters and its router row) and a channel inside one
expert (a gate row, an up row and a down column of that expert).

The config holds one expert count and one expert width for every layer, so every layer keeps the
same number of experts (which ones may differ) and every expert the same width: the form stock
transformers, vLLM and llama.cpp load. The router's top-k never exceeds the experts kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import LLAMA_PROJECTIONS, PROJECTION_NAMES, Family

ATTENTION_ONLY = {name: path for name, path in LLAMA_PROJECTIONS.items() if name in PROJECTION_NAMES[:4]}
UNIFORM = "its config holds one expert count, expert width and head count for every layer"


@dataclass(frozen=True)
class MoeLayout:
    count_key: str  # config key of the number of experts per layer
    width_key: str  # config key of each expert's width
    top_k_key: str = "num_experts_per_tok"
    block_path: str = "mlp"  # the mixture's module in a decoder layer (its output is the MLP's contribution)
    router_name: str = "gate"  # the router inside it

    @property
    def router_path(self) -> str:
        return f"{self.block_path}.{self.router_name}"

    @property
    def experts_path(self) -> str:
        return f"{self.block_path}.experts"

    def block(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.block_path)

    def router(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.router_path)

    def experts(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.experts_path)

    def refusal(self, config) -> str | None:
        """Why this config cannot be pruned by expert (None: it can)."""
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            return ("some layers have a dense MLP instead of experts (mlp_only_layers, decoder_sparse_step); "
                    "prunetune prunes models whose every layer is a mixture of experts")
        return None

    def sync_config(self, config, experts: int, width: int) -> None:
        setattr(config, self.count_key, experts)
        setattr(config, self.width_key, width)
        top_k = getattr(config, self.top_k_key)
        if top_k > experts:  # never reached through prunetune's selection, which keeps at least top-k
            raise ValueError(f"{experts} experts cannot serve a top-{top_k} router")


def _get(layer: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


MIXTRAL = Family("Mixtral", ("mixtral",), projections=dict(ATTENTION_ONLY), uniform_only=UNIFORM,
                 no_hidden_cut="a mixture of experts keeps its hidden size", moe=MoeLayout("num_local_experts",
                                                                                            "intermediate_size"))
QWEN3_MOE = Family("Qwen3-MoE", ("qwen3_moe",), projections=dict(ATTENTION_ONLY),
                   head_dim_norms=("self_attn.q_norm", "self_attn.k_norm"),
                   uniform_only=UNIFORM, no_hidden_cut="a mixture of experts keeps its hidden size",
                   moe=MoeLayout("num_experts", "moe_intermediate_size"))
OLMOE = Family("OLMoE", ("olmoe",), projections=dict(ATTENTION_ONLY),
               projection_norms={"q_proj": "self_attn.q_norm", "k_proj": "self_attn.k_norm"}, uniform_only=UNIFORM,
               no_head_cut="its q norm is as wide as the hidden size in stock transformers, so every query head stays",
               no_hidden_cut="a mixture of experts keeps its hidden size", moe=MoeLayout("num_experts",
                                                                                          "intermediate_size"))
PHIMOE = Family("PhiMoE", ("phimoe",), projections=dict(ATTENTION_ONLY), uniform_only=UNIFORM,
                no_hidden_cut="a mixture of experts keeps its hidden size",
                moe=MoeLayout("num_local_experts", "intermediate_size", router_name="router"))
GRANITEMOE = Family("GraniteMoE", ("granitemoe",), projections=dict(ATTENTION_ONLY), uniform_only=UNIFORM,
                    no_hidden_cut="a mixture of experts keeps its hidden size",
                    moe=MoeLayout("num_local_experts", "intermediate_size", block_path="block_sparse_moe",
                                  router_name="router"))
