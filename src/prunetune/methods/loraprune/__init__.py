"""LoRAPrune (Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient
Fine-Tuning", ACL Findings 2024, arXiv 2305.18403).

    pruner.py       the progressive pruner: moving-average LoRA-guided scores, cubic schedule, masks
                    (runs inside methods/prune.py's pipeline as `--method loraprune`)
    masks_agree.py  the paper's Fig. 4: do the LoRA-guided criterion and vanilla Taylor keep the same units?

The criterion itself is shared with the one-shot `lora-guided` method: importance/lora_guided.py.
"""
