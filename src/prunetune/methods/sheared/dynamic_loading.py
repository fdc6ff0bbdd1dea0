"""Sheared-LLaMA's dynamic batch loading: move the data mixture toward the domains that lag.

A pruned model does not lose every domain equally, so continued pre-training on the original
mixture wastes tokens on domains that have already recovered. The paper (Xia et al., ICLR 2024,
arXiv 2310.06694, Algorithm 1) evaluates every domain's loss L on held-out data at regular intervals
and compares it with a reference loss L_ref, the loss the target-sized model should reach:

    Δ = max(L − L_ref, 0)                 (the paper; the official code drops the clamp: Δ = L − L_ref)
    w ← softmax(log w + η·Δ)              η = 1
    w ← (1 − c)·w + c/k                   c = 1e-4 of uniform (from DoReMi), k domains

With the clamp a domain already below its reference keeps its relative weight among the others; the
official code (LLM-Shearing, `DynamicLoadingCallback.update_proportion`, "doremi" update) lets a
negative gap take weight away from it. `update_weights(..., clamp=False)` reproduces the code.

Reference losses: the paper predicts them from a scaling law L(N) = a/N^b + c fitted to the
per-domain losses of models of other sizes (`fit_scaling_law`), evaluated at the target's parameter
count. Without such points (the usual case: one source model) the reference is the source model's own
per-domain loss before pruning — the pruned model should get back to where it started — which is
what `resolve_references` falls back to. References given per domain win over both.

`DynamicLoading` is the training hook: every `eval_every` steps it measures the per-domain losses,
updates the weights and hands them to the `DomainSampler` that draws the next batches. With
`dynamic=False` it evaluates and logs the same way but never changes the weights: the fixed-mixture
baseline, compared on equal terms.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from .domains import DomainSampler, DomainSet
from ...errors import SettingError, UserError
from ...training.loop import TrainHooks

ETA = 1.0
SMOOTHING = 1e-4


# ---------------------------------------------------------------------------------------------
# The update rule


def update_weights(weights, losses, references, eta: float = ETA, smoothing: float = SMOOTHING,
                   clamp: bool = True) -> torch.Tensor:
    """One dynamic-loading update of the domain weights (float64, summing to one)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    gap = torch.as_tensor(losses, dtype=torch.float64) - torch.as_tensor(references, dtype=torch.float64)
    if clamp:
        gap = gap.clamp(min=0.0)
    w = torch.softmax(torch.log(w / w.sum()) + eta * gap, dim=0)
    w = (1.0 - smoothing) * w + smoothing / len(w)
    return w / w.sum()


def worst_gap(losses: dict[str, float], references: dict[str, float]) -> float:
    """max over domains of L − L_ref: how far the worst domain is from its reference."""
    return max(losses[name] - references[name] for name in losses)


# ---------------------------------------------------------------------------------------------
# Reference losses


def _projected_fit(x: np.ndarray, y: np.ndarray, b: float) -> tuple[float, float, float]:
    """For a fixed exponent the law is linear in (a, c): least squares gives them; returns
    (squared error, a, c), the error infinite where a ≤ 0 (the law must fall with size)."""
    design = np.stack([np.exp(-b * x), np.ones_like(x)], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    error = float(np.sum((design @ np.array([a, c]) - y) ** 2))
    return (error if a > 0 else math.inf), float(a), float(c)


def fit_scaling_law(parameters: list[float], losses: list[float]) -> tuple[float, float, float]:
    """(a, b, c) of L(N) = a/N^b + c, a > 0, b > 0, fitted by least squares on the losses.

    Variable projection: for a given b, a and c are a linear least-squares solve, so only b is
    searched — over a log-spaced grid, then refined by golden-section search around the best grid
    point. No starting point to choose and no local minimum between grid points to fall into. N is
    measured relative to the geometric mean of the sizes (x = log N − mean log N) so the columns stay
    well-conditioned for N in the billions.
    """
    n = np.asarray(parameters, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if (len(n) != len(y) or len(set(n.tolist())) < 3 or not (np.isfinite(n).all() and np.isfinite(y).all())
            or (n <= 0).any()):
        raise UserError("a scaling-law fit needs losses at 3 or more distinct positive model sizes")
    shift = float(np.log(n).mean())
    x = np.log(n) - shift
    grid = np.geomspace(1e-4, 10.0, 241)
    errors = [_projected_fit(x, y, b)[0] for b in grid]
    best = int(np.argmin(errors))
    if not math.isfinite(errors[best]):
        raise UserError("the scaling-law losses do not fall as the model grows; check the sizes and losses")
    lo, hi = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    b = math.exp(_golden_min(lambda t: _projected_fit(x, y, math.exp(t))[0], lo, hi))
    _, a_shifted, c = _projected_fit(x, y, b)
    return a_shifted * math.exp(b * shift), b, c  # a/N^b = a_shifted/(N/N0)^b with N0 = exp(shift)


def _golden_min(f: Callable[[float], float], lo: float, hi: float, iterations: int = 100) -> float:
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def predict_loss(law: tuple[float, float, float], parameters: float) -> float:
    a, b, c = law
    return a / parameters ** b + c


def resolve_references(domains: DomainSet, target_parameters: int | None,
                       source_losses: Callable[[], dict[str, float]] | None) -> tuple[dict[str, float], str]:
    """Each domain's reference loss and where it came from: a given reference first, else the
    scaling-law prediction at `target_parameters` (when points were given), else the source model's
    own loss (`source_losses()`, called at most once)."""
    references, origin = {}, {}
    law_used = bool(domains.scaling_points) and target_parameters is not None
    for name, given in ((d.name, d.reference) for d in domains.domains):
        if given is not None:
            references[name], origin[name] = given, "given"
        elif law_used:
            points = [(size, losses[name]) for size, losses in domains.scaling_points if name in losses]
            try:
                law = fit_scaling_law([p for p, _ in points], [l for _, l in points])
            except UserError as exc:
                raise UserError(f"domain '{name}': {exc}") from None
            references[name] = predict_loss(law, target_parameters)
            origin[name] = f"scaling law fit L(N) = a/N^b + c at N = {target_parameters:.3g}"
    missing = [name for name in domains.names if name not in references]
    if missing:
        if source_losses is None:
            raise SettingError("DomainSettings.references", f"no reference loss for domain '{missing[0]}'; give one "
                               "(reference: in the domains file or DomainSettings.references NAME=LOSS), scaling-law "
                               "points with the target's size, or the source model")
        measured = source_losses()
        for name in missing:
            references[name], origin[name] = float(measured[name]), "source model's loss"
    return references, _describe(origin)


def _describe(origin: dict[str, str]) -> str:
    kinds = list(dict.fromkeys(origin.values()))
    if len(kinds) == 1:
        return kinds[0]
    return "; ".join(f"{kind} ({', '.join(n for n, k in origin.items() if k == kind)})" for kind in kinds)


# ---------------------------------------------------------------------------------------------
# Per-domain evaluation


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mean_loss(model, blocks: torch.Tensor, mask: torch.Tensor, batch_size: int, device) -> float:
    """Token-weighted mean next-token loss: each batch's mean times its number of targets."""
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        labels = ids.masked_fill(~mask[i:i + batch_size].to(device), -100)
        targets = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        if targets:
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            total += float(loss) * targets
            count += targets
    if not count:
        raise ValueError("no target tokens to evaluate")
    return total / count


@torch.no_grad()
def domain_losses(model: nn.Module, per_domain: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                  device=None) -> dict[str, float]:
    """Mean next-token loss of every domain, in eval mode; the model's training mode is restored."""
    device = device if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    try:
        return {name: _mean_loss(model, blocks, mask, batch_size, device)
                for name, (blocks, mask) in per_domain.items()}
    finally:
        model.train(was_training)


def _agree(values: list[float], device) -> list[float]:
    """Rank 0's values on every process, so all processes draw batches from identical weights even
    if their evaluations differ in the last bit."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return tensor.tolist()


# ---------------------------------------------------------------------------------------------
# The training hook


class DynamicLoading(TrainHooks):
    """Evaluate every domain every `eval_every` steps and move the sampler's weights (dynamic
    batch loading); with `dynamic=False` evaluate and log alike but keep the weights fixed."""

    def __init__(self, model: nn.Module, sampler: DomainSampler, names, eval_blocks: dict,
                 references: dict[str, float], *, eval_every: int, eta: float = ETA, smoothing: float = SMOOTHING,
                 clamp: bool = True, batch_size: int = 4, device=None, dynamic: bool = True):
        self.names = tuple(names)
        if eval_every < 1:
            raise SettingError("DomainSettings.eval_every",
                               f"DomainSettings.eval_every must be at least 1, got {eval_every}")
        if set(eval_blocks) != set(self.names) or set(references) != set(self.names):
            raise ValueError(f"evaluation blocks and references must cover exactly the domains {self.names}")
        if len(sampler.weights) != len(self.names):
            raise ValueError(f"the sampler has {len(sampler.weights)} domains, not {len(self.names)}")
        self.model, self.sampler = model, sampler
        self.eval_blocks = {name: eval_blocks[name] for name in self.names}
        self.references = {name: float(references[name]) for name in self.names}
        self.eval_every, self.eta, self.smoothing, self.clamp = eval_every, eta, smoothing, clamp
        self.batch_size, self.device, self.dynamic = batch_size, device, dynamic
        self.losses: dict[str, float] | None = None  # the latest evaluation
        self._drew = sampler.weights  # the weights that drew the current step's batch
        self._evaluated = False

    def _as_dict(self, values) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.names, values)}

    def evaluate(self) -> dict[str, float]:
        losses = domain_losses(self.model, self.eval_blocks, self.batch_size, self.device)
        agreed = _agree([losses[n] for n in self.names], self.device or _device_of(self.model))
        return self._as_dict(agreed)

    def after_optimizer_step(self, step: int) -> None:
        self._drew = self.sampler.weights
        self._evaluated = (step + 1) % self.eval_every == 0
        if not self._evaluated:
            return
        self.losses = self.evaluate()
        if self.dynamic:
            self.sampler.set_weights(update_weights(
                self._drew, [self.losses[n] for n in self.names], [self.references[n] for n in self.names],
                eta=self.eta, smoothing=self.smoothing, clamp=self.clamp))

    def log_entry(self, step: int) -> dict:
        entry = {"domain_weights": self._as_dict(self._drew.tolist())}
        if self._evaluated:
            entry |= {"domain_losses": dict(self.losses), "reference_losses": dict(self.references)}
        return entry

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.losses = state["losses"]
        self._drew = self.sampler.weights
