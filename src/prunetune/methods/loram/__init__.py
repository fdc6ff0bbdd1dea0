"""LoRAM (Zhang, Wang et al., "Train Small, Infer Large: Memory-Efficient LoRA Training for Large
Language Models", ICLR 2025, arXiv 2502.13533).

    pipeline.py  prune -> align -> train (optionally NF4: QLoRAM) -> recover, one function each
    sparse.py    the non-structured prunings (unstructured, 2:4), which keep the weights' shapes
    run.py       `prunetune loram run`: every step in its own process, and the comparison with full-model LoRA

Recovering an adapter to the full model's shapes is shared structure: structure/recover.py.
"""
