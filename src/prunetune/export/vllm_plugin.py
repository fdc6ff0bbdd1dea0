"""The vLLM plugin: serves prunetune outputs whose decoder layers have different shapes.

vLLM calls `register()` in each of its processes through the entry point
`[project.entry-points."vllm.general_plugins"] prunetune = "prunetune.export.vllm_plugin:register"`.
It registers the architecture `PrunetuneForCausalLM` (what config.json of a per-layer output names)
by its import path, so nothing heavy (torch, vLLM's model code) is imported until vLLM builds one.
Outputs whose layers share one shape keep their stock architecture and do not need this.
"""

ARCHITECTURE = "PrunetuneForCausalLM"
MODEL_CLASS = "prunetune.export.vllm_model:PrunetuneForCausalLM"


def register() -> None:
    """Register `PrunetuneForCausalLM` with vLLM's model registry (lazily, by import path)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
