"""Sheared-LLaMA (Xia et al., "Sheared LLaMA: Accelerating Language Model Pre-training via
Structured Pruning", ICLR 2024, arXiv 2310.06694).

    shear.py            `prunetune shear`: hard-concrete masks to a target shape with Lagrange multipliers
    continued.py        `prunetune train`: continued pre-training of the result
    domain_training.py  what both stages share: domains, per-domain validation, the trainable weights
    domains.py          named data domains and the per-domain batch sampler
    dynamic_loading.py  dynamic batch loading: re-weight the domains by how far each lags its reference

The masks themselves are shared structure: structure/l0_masks.py, structure/hard_concrete.py, structure/target.py.
"""
