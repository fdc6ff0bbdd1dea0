"""Training on several data domains: what shearing and continued pre-training share.

Both draw every batch from named domains (`code=builtin:stdlib-code,prose=builtin:pydoc` or a YAML
file, methods/sheared/domains.py) in proportions that either stay at the initial mixture or follow Sheared-LLaMA's
dynamic batch loading (methods/sheared/dynamic_loading.py). Either way the same hook measures each domain's
validation loss every `eval_every` steps against its reference loss and logs the weights, so a fixed
mixture and a dynamic one are compared on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...data import DataSpec, load_examples
from .domains import DomainSampler, DomainSet, load_domain_blocks, parse_domains
from ...errors import SettingError, UserError
from ...evaluate.perplexity import perplexity
from ...training.lora import LoraSettings, add_lora
from ...training.loop import TrainSettings
from .dynamic_loading import DynamicLoading, domain_losses, resolve_references


@dataclass
class DomainSettings:
    data: str = "code=builtin:stdlib-code,prose=builtin:pydoc"
    weights: str | None = None  # initial proportions, e.g. code=0.7,prose=0.3 (default: the file's, or equal)
    references: str | None = None  # given reference losses, e.g. code=1.9,prose=2.2
    dynamic: bool = False  # dynamic batch loading; False keeps the initial mixture
    eval_every: int = 10  # steps between per-domain validation losses (and weight updates)
    eval_blocks: int = 8  # held-out sequences per domain for that validation loss
    eta: float = 1.0  # step size of the weight update (the paper's 1)
    smoothing: float = 1e-4  # share of the uniform distribution mixed into the weights
    clamp: bool = True  # the paper's max(L - L_ref, 0); False: the official code's unclamped variant

    def check(self) -> DomainSet:
        """Validate the settings, parse the domains and read every domain's data (without a tokenizer),
        so that a bad spec or file in any domain fails before a model loads."""
        for name in ("eval_every", "eval_blocks"):
            if getattr(self, name) < 1:
                raise SettingError(f"DomainSettings.{name}",
                                   f"DomainSettings.{name} must be at least 1, got {getattr(self, name)}")
        if self.eta <= 0:
            raise SettingError("DomainSettings.eta", f"DomainSettings.eta must be positive, got {self.eta}")
        if not 0 <= self.smoothing < 1:
            raise SettingError("DomainSettings.smoothing",
                               f"DomainSettings.smoothing is a share in [0, 1), got {self.smoothing}")
        domains = parse_domains(self.data, self.weights, self.references)
        for domain in domains.domains:
            try:
                load_examples(domain.data, default_split="train")
            except UserError as exc:
                raise SettingError("DomainSettings.data", f"domain '{domain.name}': {exc}") from None
        return domains


@dataclass
class DomainRun:
    """Everything the training loop needs to draw from the domains, and what to record about them."""

    domains: DomainSet
    blocks: object  # the concatenated training blocks
    loss_mask: object
    sampler: DomainSampler
    hook: DynamicLoading
    references: dict[str, float]
    reference_source: str
    eval_sets: dict

    def record(self) -> dict:
        return {
            "domains": [{"name": d.name, "data": d.data, "initial_weight": float(w)}
                        for d, w in zip(self.domains.domains, self.domains.weights)],
            "dynamic_loading": self.hook.dynamic,
            "reference_losses": self.references,
            "reference_source": self.reference_source,
            "final_weights": dict(zip(self.domains.names, map(float, self.sampler.weights))),
        }


def prepare_domains(model, tokenizer, settings: DomainSettings, domains: DomainSet, training: TrainSettings,
                    accelerator, *, target_parameters: int | None,
                    source_losses: Callable[[dict], dict[str, float]] | None) -> DomainRun:
    """Load every domain's training and validation blocks, settle the reference losses, and build the
    sampler and the hook. `source_losses(eval_sets)` gives the source model's own per-domain loss
    (the default reference); it is only called when nothing else gives the references."""
    train_blocks = load_domain_blocks(domains, tokenizer, training.seq_len, "train")
    eval_sets = load_domain_blocks(domains, tokenizer, training.seq_len, "eval",
                                   max_blocks=settings.eval_blocks).per_domain()
    references, source = resolve_references(
        domains, target_parameters, (lambda: source_losses(eval_sets)) if source_losses else None)
    sampler = DomainSampler(train_blocks.ranges, training, accelerator.num_processes, accelerator.process_index,
                            domains.weights)
    hook = DynamicLoading(model, sampler, domains.names, eval_sets, references, eval_every=settings.eval_every,
                          eta=settings.eta, smoothing=settings.smoothing, clamp=settings.clamp,
                          batch_size=training.batch_size, device=accelerator.device, dynamic=settings.dynamic)
    return DomainRun(domains, train_blocks.blocks, train_blocks.loss_mask, sampler, hook, references, source,
                     eval_sets)


def model_losses(model, batch_size: int) -> Callable[[dict], dict[str, float]]:
    """The per-domain validation loss of `model` as it is now (for the source-model reference)."""
    return lambda eval_sets: domain_losses(model, eval_sets, batch_size)


def domain_perplexities(model, tokenizer, domains: DomainSet, seq_len: int, max_windows: int | None,
                        progress: bool) -> dict[str, dict]:
    """Held-out perplexity of every domain (the eval split of its data)."""
    return {d.name: perplexity(model, tokenizer, f"{DataSpec.parse(d.data).source}@eval", seq_len,
                               max_windows=max_windows, progress=progress).to_dict()
            for d in domains.domains}


def trainable(model, lora: LoraSettings | None, seed: int):
    """Every weight trains (`lora` None), or a fresh LoRA whose initialisation depends on the seed alone."""
    if lora is not None:
        torch.manual_seed(seed)
        return add_lora(model, lora)
    for param in model.parameters():
        param.requires_grad_(True)
    return model

