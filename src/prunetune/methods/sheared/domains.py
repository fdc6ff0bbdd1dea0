"""Data domains for continued pre-training, and the sampler that draws each batch from them.

Sheared-LLaMA continues pre-training on a mixture of domains whose proportions change during
training (dynamic batch loading, methods/sheared/dynamic_loading.py). This module holds the parts that do not
depend on the update rule: which domains there are (`parse_domains`), their token blocks
(`load_domain_blocks`), and `DomainSampler`, which picks the rows of every batch from the current
proportions.

Domains are named on the command line, `code=builtin:stdlib-code,prose=builtin:pydoc` (equal initial
weights), or in a YAML file:

    domains:
      code:  {data: builtin:stdlib-code, weight: 0.6, reference: 1.9}
      prose: {data: builtin:pydoc, weight: 0.4}
    scaling_law:   # optional: (size, per-domain loss) points to predict the reference losses
      - {parameters: 1.3e9, losses: {code: 1.2, prose: 2.0}}
      ...

Each domain's data spec (data.py) gives its train split for training and its eval split for the
evaluations that move the weights, so a domain's spec carries no `@split` of its own.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...data import DataSpec, load_blocks
from ...errors import SettingError, UserError
from ...training.loop import TrainSettings

DATA_SETTING = "DomainSettings.data"  # the field that names the domains (parse_domains' `spec`)
SYNTAX = "name each domain: code=builtin:stdlib-code,prose=builtin:pydoc (or give a .yaml file)"
YAML_SUFFIXES = (".yaml", ".yml")
DOMAIN_KEYS = ("data", "weight", "reference")
MIN_SCALING_POINTS = 3


@dataclass(frozen=True)
class Domain:
    name: str
    data: str  # a data spec of data.py: its train split trains, its eval split validates
    weight: float  # initial proportion (normalised over the domains)
    reference: float | None = None  # a given reference loss, if any


@dataclass(frozen=True)
class DomainSet:
    domains: tuple[Domain, ...]
    # (model parameters, {domain: loss}) points for fitting L(N) = a/N^b + c per domain
    scaling_points: tuple[tuple[float, dict[str, float]], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.domains)

    @property
    def weights(self) -> torch.Tensor:
        """The initial proportions, float64, summing to one."""
        w = torch.tensor([d.weight for d in self.domains], dtype=torch.float64)
        return w / w.sum()

    @property
    def references(self) -> dict[str, float]:
        """The reference losses given by the user (domains without one are absent)."""
        return {d.name: d.reference for d in self.domains if d.reference is not None}


# ---------------------------------------------------------------------------------------------
# Parsing


def _number(text, what: str, *, minimum: float = 0.0) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got '{text}'") from None
    if not math.isfinite(value) or value < minimum:
        raise UserError(f"{what} must be a finite number of at least {minimum:g}, got '{text}'")
    return value


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    """`a=x,b=y` -> [(a, x), (b, y)], with one-line errors that show the syntax."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            raise SettingError(what, f"empty entry in {what} '{text}' (a stray comma?); write NAME=VALUE,NAME=VALUE")
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep:
            raise SettingError(what, f"'{item.strip()}' in {what} is not NAME=VALUE; {SYNTAX}" if what == DATA_SETTING
                               else f"'{item.strip()}' in {what} is not NAME=NUMBER; write e.g. code=0.7,prose=0.3")
        if not name or not value:
            raise SettingError(what, f"empty name or value in {what} '{text}'; write NAME=VALUE,NAME=VALUE")
        pairs.append((name, value))
    return pairs


def _check_data(name: str, spec: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"domain '{name}' needs a data spec (data: builtin:pydoc, a file, or hf:OWNER/NAME)")
    spec = spec.strip()
    # An explicit '@train'/'@eval' would make training and evaluation read the same split.
    if DataSpec.parse(spec, "train") == DataSpec.parse(spec, "eval"):
        raise UserError(f"domain '{name}': drop the '@{DataSpec.parse(spec).split}' from '{spec}'; a domain "
                        "trains on its train split and is evaluated on its eval split")
    return spec


def _from_command_line(spec: str) -> list[dict]:
    if "=" not in spec:
        raise SettingError(DATA_SETTING, f"'{spec}' is a single data spec, not a list of domains; {SYNTAX}")
    return [{"name": name, "data": data} for name, data in _pairs(spec, DATA_SETTING)]


def _read_yaml(path: Path):
    import yaml

    if not path.is_file():
        raise UserError(f"no such domains file: '{path}'")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path}: not valid YAML{line} ({getattr(exc, 'problem', None) or 'syntax error'})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def _from_yaml(path: Path) -> tuple[list[dict], list]:
    """The domain entries and the raw scaling-law points of a domains file."""
    document = _read_yaml(path)
    if not isinstance(document, dict) or not isinstance(document.get("domains"), dict) or not document["domains"]:
        raise UserError(f"{path}: expected a mapping 'domains:' of name -> {{data: SPEC, weight: W, reference: L}}")
    unknown = set(document) - {"domains", "scaling_law"}
    if unknown:
        raise UserError(f"{path}: unknown top-level key '{sorted(unknown)[0]}'; use 'domains' and 'scaling_law'")
    entries = []
    for name, body in document["domains"].items():
        body = {"data": body} if isinstance(body, str) else body  # `name: SPEC` shorthand
        if not isinstance(body, dict):
            raise UserError(f"{path}: domain '{name}' must be a mapping {{data: SPEC, weight: W, reference: L}}")
        extra = set(body) - set(DOMAIN_KEYS)
        if extra:
            raise UserError(f"{path}: domain '{name}' has an unknown key '{sorted(extra)[0]}'; "
                            f"use {', '.join(DOMAIN_KEYS)}")
        entries.append({"name": str(name) if name is not None else ""} | body)
    points = document.get("scaling_law") or []
    if not isinstance(points, list):
        raise UserError(f"{path}: 'scaling_law' must be a list of {{parameters: N, losses: {{domain: loss}}}}")
    return entries, points


def _scaling_points(raw: list, names: tuple[str, ...], given: dict[str, float]) -> tuple:
    """Checked (parameters, {domain: loss}) points; every domain without a given reference needs
    a loss at every size, and at least three sizes, for the three-parameter fit."""
    if not raw:
        return ()
    points = []
    for n, point in enumerate(raw, 1):
        if (not isinstance(point, dict) or set(point) != {"parameters", "losses"}
                or not isinstance(point["losses"], dict)):
            raise UserError(f"scaling_law point {n} must be {{parameters: N, losses: {{domain: loss}}}}")
        size = _number(point["parameters"], f"scaling_law point {n}: parameters", minimum=1.0)
        losses = {}
        for name, loss in point["losses"].items():
            if name not in names:
                raise UserError(f"scaling_law point {n} names unknown domain '{name}'; domains are {', '.join(names)}")
            losses[name] = _number(loss, f"scaling_law point {n}: loss of '{name}'")
        missing = [d for d in names if d not in losses and d not in given]
        if missing:
            raise UserError(f"scaling_law point {n} has no loss for domain '{missing[0]}'; give every domain's "
                            "loss at every size (or a reference for that domain)")
        points.append((size, losses))
    for name in names:
        sizes = {size for size, losses in points if name in losses}
        if name not in given and len(sizes) < MIN_SCALING_POINTS:
            raise UserError(f"the scaling law of domain '{name}' has {len(sizes)} model size(s); "
                            f"give at least {MIN_SCALING_POINTS} for L(N) = a/N^b + c")
    return tuple(points)


def _override(entries: list[dict], text: str | None, key: str, what: str) -> None:
    if not text:
        return
    by_name = {e["name"]: e for e in entries}
    for name, value in _pairs(text, what):
        if name not in by_name:
            raise SettingError(what, f"unknown domain '{name}' in {what}; domains are {', '.join(by_name)}")
        by_name[name][key] = value


def parse_domains(spec: str, weights: str | None = None, references: str | None = None) -> DomainSet:
    """Domains from `name=SPEC,...` or a YAML file; `weights` (`code=0.7,prose=0.3`) and
    `references` (`code=1.9`) from the command line override the file."""
    spec = (spec or "").strip()
    if not spec:
        raise SettingError(DATA_SETTING, f"no domains given; {SYNTAX}")
    if Path(spec).suffix.lower() in YAML_SUFFIXES:
        entries, raw_points = _from_yaml(Path(spec).expanduser())
    else:
        entries, raw_points = _from_command_line(spec), []
    _override(entries, weights, "weight", "DomainSettings.weights")
    _override(entries, references, "reference", "DomainSettings.references")
    domains = tuple(_domain(e) for e in entries)
    names = tuple(d.name for d in domains)
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise UserError(f"domain '{duplicate}' is named twice; give each domain its own name")
    if sum(d.weight for d in domains) <= 0:
        raise UserError("the domain weights are all zero; give at least one domain a positive weight")
    given = {d.name: d.reference for d in domains if d.reference is not None}
    return DomainSet(domains, _scaling_points(raw_points, names, given))


def _domain(entry: dict) -> Domain:
    name = entry["name"].strip()
    if not name or any(c in name for c in ",=") or name != entry["name"]:
        raise UserError(f"bad domain name '{entry['name']}'; use a non-empty name without ',' '=' or spaces around it")
    reference = entry.get("reference")
    return Domain(
        name=name,
        data=_check_data(name, entry.get("data")),
        weight=_number(entry.get("weight", 1.0), f"the weight of domain '{name}'"),
        reference=None if reference is None else _number(reference, f"the reference loss of domain '{name}'"),
    )


# ---------------------------------------------------------------------------------------------
# Blocks


@dataclass
class DomainBlocks:
    """Every domain's blocks, concatenated; domain i owns rows ranges[i][0]:ranges[i][1]."""

    names: tuple[str, ...]
    blocks: torch.Tensor  # int64 [N, seq_len]
    loss_mask: torch.Tensor  # bool [N, seq_len]
    ranges: tuple[tuple[int, int], ...]

    def per_domain(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (self.blocks[a:b], self.loss_mask[a:b]) for name, (a, b) in zip(self.names, self.ranges)}


def load_domain_blocks(domains: DomainSet, tokenizer, seq_len: int, split: str,
                       max_blocks: int | None = None) -> DomainBlocks:
    """Tokenise and pack one split of every domain (`max_blocks` per domain)."""
    blocks, masks, ranges, start = [], [], [], 0
    for d in domains.domains:
        ids, mask = load_blocks(d.data, tokenizer, seq_len, default_split=split, max_blocks=max_blocks)
        blocks.append(ids)
        masks.append(mask)
        ranges.append((start, start + len(ids)))
        start += len(ids)
    return DomainBlocks(domains.names, torch.cat(blocks), torch.cat(masks), tuple(ranges))


# ---------------------------------------------------------------------------------------------
# Sampling


def _seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of `parts` (Python's hash() would also do for ints,
    but this states the intent and does not depend on the interpreter)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_weights(weights) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().clone()
    if w.dim() != 1 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"domain weights must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


class DomainSampler:
    """The rows of each batch, drawn domain by domain from the current weights.

    For global micro-batch (step, micro) — batch_size x processes examples — every example's domain
    is drawn from the weights with a generator seeded by (seed, step, micro), the same on every
    process; each domain then hands out its next block through its own permutation, reshuffled every
    time that domain is used up (seeded by seed, domain, epoch). Every process advances all cursors
    for the whole global batch and keeps its own slice, so one process with batch 2b sees the rows
    that two processes with batch b see together. The cursors make the rows depend on the past
    weights, so they are state: `state_dict` goes into the checkpoint (through the hooks) and a
    resumed run draws exactly what an uninterrupted one would.

    Micro-batches must be drawn in order. One that lies ahead is reached by drawing the ones in
    between with the current weights, so a sampler whose weights never change needs no saved state.
    """

    def __init__(self, ranges, settings: TrainSettings, num_processes: int, process_index: int,
                 weights: torch.Tensor):
        self.ranges = tuple((int(a), int(b)) for a, b in ranges)
        if not self.ranges or any(b <= a for a, b in self.ranges):
            raise ValueError(f"every domain needs at least one block, got row ranges {self.ranges}")
        self.settings = settings
        self.world, self.rank = num_processes, process_index
        self._weights = _check_weights(weights)
        if len(self._weights) != len(self.ranges):
            raise ValueError(f"{len(self._weights)} weights for {len(self.ranges)} domains")
        self._cursors = [0] * len(self.ranges)  # blocks handed out so far, per domain
        self._next = 0  # the global micro-batch index drawn next
        self._last: tuple[int, torch.Tensor] | None = None  # (index, rows) of the last draw
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # domain -> (epoch, permutation)

    @property
    def weights(self) -> torch.Tensor:
        return self._weights.clone()

    def set_weights(self, weights) -> None:
        self._weights = _check_weights(weights)

    def _permutation(self, domain: int, epoch: int) -> torch.Tensor:
        cached = self._perms.get(domain)
        if cached is None or cached[0] != epoch:
            a, b = self.ranges[domain]
            generator = torch.Generator().manual_seed(_seed("perm", self.settings.seed, domain, epoch))
            cached = (epoch, a + torch.randperm(b - a, generator=generator))
            self._perms[domain] = cached
        return cached[1]

    def _next_block(self, domain: int) -> int:
        a, b = self.ranges[domain]
        epoch, position = divmod(self._cursors[domain], b - a)
        self._cursors[domain] += 1
        return int(self._permutation(domain, epoch)[position])

    def _draw(self, index: int) -> torch.Tensor:
        """The whole global micro-batch `index`: its domains, then each domain's next blocks."""
        step, micro = divmod(index, self.settings.grad_accum)
        generator = torch.Generator().manual_seed(_seed("mix", self.settings.seed, step, micro))
        size = self.settings.batch_size * self.world
        domains = torch.multinomial(self._weights, size, replacement=True, generator=generator)
        return torch.tensor([self._next_block(int(d)) for d in domains], dtype=torch.long)

    def rows(self, step: int, micro: int) -> torch.Tensor:
        index = step * self.settings.grad_accum + micro
        if self._last is not None and self._last[0] == index:
            return self._last[1].clone()
        if index < self._next:
            raise ValueError(f"micro-batch {micro} of step {step} was drawn already; draw batches in order")
        while self._next <= index:
            drawn = self._draw(self._next)
            self._next += 1
        b = self.settings.batch_size
        self._last = (index, drawn[self.rank * b:(self.rank + 1) * b])
        return self._last[1].clone()

    def state_dict(self) -> dict:
        return {"weights": self._weights.clone(), "cursors": list(self._cursors), "next": self._next}

    def load_state_dict(self, state: dict) -> None:
        # Taken as saved, not renormalised: a last-bit change could alter a later draw.
        self._weights = torch.as_tensor(state["weights"], dtype=torch.float64).clone()
        self._cursors = [int(c) for c in state["cursors"]]
        self._next = int(state["next"])
        self._last = None
