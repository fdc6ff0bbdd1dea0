"""A teacher's top-k next-token log-probabilities, computed once and kept on disk.

Full-parameter distillation otherwise holds a second copy of the model in memory for the whole run
and runs its forward on every step. With a cache the teacher runs once over every training block,
its k most likely next tokens and their log-probabilities at each position go to one safetensors
file, and the teacher leaves memory before training starts; training reads each batch's rows from
the file (memory-mapped). A second run on the same blocks (another seed, learning rate or student)
reuses the file and never loads the teacher.

The loss on a cached teacher is the KL divergence between the two distributions coarsened to k + 1
outcomes, the teacher's k tokens and one bucket for the rest of the vocabulary:

    KL_k = Σ_{i ∈ top-k} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

It is never negative, zero when the student matches the teacher on those k + 1 outcomes, and equal
to the full KL when k is the vocabulary (distill.chunked_topk_distillation computes it). Rows are
found by a hash of their token ids, so the sampler's order (fixed mixture or dynamic batch loading)
does not matter; a row the cache lacks is an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from ..modeling import eval_mode
from .loss import CHUNK_ELEMENTS, FinalHidden

FILE_NAME = "teacher-topk.safetensors"
DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class CacheKey:
    """What a cache was built for; a file built for anything else is rebuilt."""

    teacher: str
    top_k: int
    temperature: float
    seq_len: int
    quant: str | None = None  # how the teacher was loaded (an 8-bit teacher gives other distributions)


def row_hashes(blocks: torch.Tensor) -> torch.Tensor:
    """One 64-bit hash per row of token ids (blake2b of the row's int64 bytes)."""
    rows = blocks.to(torch.int64).cpu().numpy()
    return torch.tensor([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
                         for row in rows], dtype=torch.int64)


@torch.no_grad()
def build_cache(teacher: nn.Module, blocks: torch.Tensor, path: Path, key: CacheKey, batch_size: int,
                device: torch.device | str) -> dict:
    """Run `teacher` over every row of `blocks` and write its top-k at each position to `path`
    (through a temporary name, so an interrupted build leaves no file that looks whole)."""
    if key.top_k < 1:
        raise UserError(f"the teacher cache needs a top-k of at least 1, got {key.top_k}")
    started = time.perf_counter()
    final_hidden = FinalHidden(teacher)
    head = final_hidden.head
    vocab = head.weight.shape[0]
    k = min(key.top_k, vocab)
    hashes = row_hashes(blocks)
    unique = _first_of_each(hashes)
    positions = blocks.shape[1] - 1  # position t predicts token t + 1; the last predicts nothing scored
    ids = torch.empty(len(unique), positions, k, dtype=torch.int32)
    logp = torch.empty(len(unique), positions, k, dtype=torch.float32)
    rest = torch.full((len(unique), positions), float("-inf"))  # log of what the top k leave
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    with eval_mode(teacher):
        for start in range(0, len(unique), batch_size):
            rows = unique[start:start + batch_size]
            hidden = final_hidden(blocks[rows].to(device))[:, :-1]
            flat = hidden.reshape(-1, hidden.shape[-1])
            top_v, top_i, top_rest = [], [], []
            for at in range(0, flat.shape[0], chunk):
                scaled = head(flat[at:at + chunk]).float().div_(key.temperature).log_softmax(dim=-1)
                values, indices = scaled.topk(k, dim=-1)
                top_v.append(values)
                top_i.append(indices)
                if k < vocab:
                    top_rest.append(scaled.scatter_(-1, indices, float("-inf")).logsumexp(dim=-1))
            shape = (len(rows), positions, k)
            ids[start:start + len(rows)] = torch.cat(top_i).reshape(shape).to(torch.int32).cpu()
            logp[start:start + len(rows)] = torch.cat(top_v).reshape(shape).cpu()
            if top_rest:
                rest[start:start + len(rows)] = torch.cat(top_rest).reshape(shape[:2]).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    metadata = {"key": json.dumps(asdict(key)), "vocab": str(vocab)}
    save_file({"ids": ids, "logp": logp, "rest": rest, "row_hash": hashes[unique]}, str(partial), metadata=metadata)
    partial.replace(path)
    return {"path": str(path), "rows": len(unique), "top_k": k, "bytes": path.stat().st_size,
            "build_seconds": round(time.perf_counter() - started, 2)}


def _first_of_each(hashes: torch.Tensor) -> list[int]:
    """The first index of every distinct row hash (a corpus may repeat a block)."""
    first: dict[int, int] = {}
    for index, value in enumerate(hashes.tolist()):
        first.setdefault(value, index)
    return sorted(first.values())


class CachedTeacher:
    """A teacher read from a cache file: `lookup(ids)` gives each row's top-k token ids and
    log-probabilities at every position but the last."""

    def __init__(self, path: Path):
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        metadata = self._file.metadata()
        self.key = CacheKey(**json.loads(metadata["key"]))
        self.vocab = int(metadata["vocab"])
        self._ids = self._file.get_slice("ids")
        self._logp = self._file.get_slice("logp")
        self._rest = self._file.get_slice("rest")
        self.index = {h: i for i, h in enumerate(self._file.get_tensor("row_hash").tolist())}

    def held_tensors(self) -> list[torch.Tensor]:
        """Nothing in tensor memory: the file is memory-mapped, and each batch's rows are read as it comes."""
        return []

    def missing(self, blocks: torch.Tensor) -> int:
        """How many rows of `blocks` the cache lacks."""
        return sum(h not in self.index for h in row_hashes(blocks).tolist())

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top-k token ids, their log-probabilities, the log of the rest's probability) of each row."""
        rows = []
        for h in row_hashes(ids).tolist():
            if h not in self.index:
                raise UserError(f"the teacher cache '{self.path}' has no entry for a training row; delete it to "
                                "build it again for this data")
            rows.append(self.index[h])
        top_ids = torch.stack([self._ids[i] for i in rows]).to(device=ids.device, dtype=torch.long)
        top_logp = torch.stack([self._logp[i] for i in rows]).to(ids.device)
        rest = torch.stack([self._rest[i] for i in rows]).to(ids.device)
        return top_ids, top_logp, rest


def open_cache(path: Path, key: CacheKey, blocks: torch.Tensor) -> tuple[CachedTeacher | None, str]:
    """The cache at `path` if it was built for `key` and holds every row of `blocks`, else None and why."""
    if not path.exists():
        return None, "no cache yet"
    try:
        cached = CachedTeacher(path)
    except Exception as exc:  # a damaged or foreign file: rebuilt, not trusted
        return None, f"unreadable ({type(exc).__name__})"
    if cached.key != key:
        return None, f"built for {asdict(cached.key)}"
    missing = cached.missing(blocks)
    if missing:
        return None, f"lacks {missing} of this run's {len(blocks)} training rows"
    return cached, "reused"


def cached_source_teacher(teacher_spec: str, directory: Path, blocks: torch.Tensor, key: CacheKey, *, dtype: str,
                          accelerator, batch_size: int, log) -> tuple[CachedTeacher, dict]:
    """The cache in `directory` for these blocks, built first (the teacher loaded, run once and freed)
    when there is none or it was built for something else. Under several processes the main one builds."""
    from ..models import load_model

    path = Path(directory) / FILE_NAME
    cached, why = open_cache(path, key, blocks)
    if cached is not None:
        log(f"distilling from the teacher cache {path} ({key.teacher}'s top {key.top_k}; reused)")
        return cached, {"path": str(path), "built": False, "top_k": key.top_k, "bytes": path.stat().st_size}
    info: dict = {}
    if accelerator.is_main_process:
        log(f"building the teacher cache {path} ({why}): {key.teacher}'s top {key.top_k} over {len(blocks)} rows")
        teacher, _ = load_model(key.teacher, dtype=dtype, device=str(accelerator.device), quant=key.quant)
        info = build_cache(teacher, blocks, path, key, batch_size, accelerator.device)
        info["teacher_model_bytes"] = sum(t.numel() * t.element_size() for t in (*teacher.parameters(),
                                                                                  *teacher.buffers()))
        del teacher  # gone before training starts: the run's training peak holds no second model
    accelerator.wait_for_everyone()
    cached, why = open_cache(path, key, blocks)
    if cached is None:
        raise UserError(f"the teacher cache {path} could not be read back ({why}); delete it and run again")
    return cached, {"built": True, **info}
