"""The measured default learning rates: one place for the library and the command line, which reads
them without importing torch. A run whose `TrainSettings.lr` is unset trains at its method's rate."""

LORA_LR = 5e-4  # an adapter's peak rate, measured on SmolLM2-135M (LoRAPrune's quality benchmark, LoRAM's)
FULL_LR = 1e-4  # every weight trained (shear, train): the official Sheared-LLaMA code's rate
ALIGN_LR = 1e-4  # LoRAM's distilled alignment of the pruned model, measured against 1e-5 (docs/methods/loram.md)
