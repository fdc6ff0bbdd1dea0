"""The three papers, each a package that orchestrates the shared core, and the pipeline they share.

    prune.py     load -> score once or train LoRAPrune -> masks -> cut -> recover -> save: every
                 pruning method (LoRAPrune, and the one-shot baselines magnitude, Taylor,
                 Wanda-sp, random, lora-guided); LoRAM's structured pruning goes through it too
    loraprune/   LoRAPrune (Zhang et al., ACL Findings 2024)
    sheared/     Sheared-LLaMA (Xia et al., ICLR 2024): targeted pruning, domains, dynamic batch
                 loading, continued pre-training
    loram/       LoRAM (Zhang, Wang et al., ICLR 2025): prune, align, train, recover
"""
