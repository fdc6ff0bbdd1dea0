"""Every form prunetune writes a model in, for the engines users serve with.

- `hf`: the Hugging Face directory (stock transformers and vLLM load it when every layer has one shape).
- `gguf`: one `.gguf` file for llama.cpp and Ollama.
- `vllm_plugin`: the vLLM plugin that serves layers of different shapes (an entry point of the
  `vllm.general_plugins` group; vLLM imports it, prunetune never does).
"""

# Here, not in gguf.py, so that checking a command line needs neither numpy nor torch.
GGUF_OUTTYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"  # what `--export gguf` writes inside a run directory when the run ends
