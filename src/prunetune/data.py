"""Text sources by spec string, tokenising, packing into blocks, deterministic train/eval splits.

A spec is `SOURCE` or `SOURCE@SPLIT`:
  builtin:pydoc        English technical prose shipped with every Python (pydoc_data.topics)
  builtin:stdlib-code  the standard library's top-level modules (Python code)
  wikitext2, ptb, c4, alpaca       through `datasets` (needs the Hugging Face hub)
  hf:OWNER/NAME[:CONFIG]           any hub dataset with a `text` column (or instruction/chat records)
  path/to/file.{txt,jsonl,json,parquet}

Records in json/jsonl/parquet files are `text`, instruction records `instruction`/`input`/`output`,
or chat `messages`. Instruction and chat records carry which part is the response, so training can
put the loss on responses only.

Splits: `train`, `eval` and `all`. Hub sets use their own splits (eval = wikitext2 test, ptb
validation, c4 validation, an `hf:` set's `validation` split when it has one); everything else holds
out its last 10% of documents (or, for fewer than ten documents, the last 10% of lines), so the split
never depends on the tokenizer. `all` is the whole source (a hub set's train and eval splits together).
Which split a spec without one means depends on its use: training reads `train`, evaluations `eval`,
except `prunetune eval`, which scores a local file whole (`eval_command_spec`): it is the user's test set.
"""

from __future__ import annotations

import codecs
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

OFFLINE_SOURCES = ("builtin:pydoc", "builtin:stdlib-code")
HUB_SOURCES = ("wikitext2", "ptb", "c4", "alpaca")
HF_PREFIX = "hf:"  # hf:OWNER/NAME[:CONFIG], any dataset on the Hugging Face hub
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SPLITS = ("train", "eval", "all")
EVAL_FRACTION = 0.1
OFFLINE_HINT = "offline alternatives: builtin:pydoc, builtin:stdlib-code, or a local .txt/.jsonl/.json/.parquet file"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One record: `response` always takes the loss; `prompt` only when training on whole text."""

    prompt: str = ""
    response: str = ""
    messages: tuple | None = None  # chat records, formatted with the tokenizer's template

    @property
    def is_plain_text(self) -> bool:
        return not self.prompt and self.messages is None


@dataclass(frozen=True)
class DataSpec:
    source: str
    split: str

    @classmethod
    def parse(cls, spec: str, default_split: str = "train") -> "DataSpec":
        """`SOURCE` or `SOURCE@SPLIT`; a file whose own name contains '@' still works."""
        source, sep, split = spec.rpartition("@")
        if not sep or (split not in SPLITS and Path(spec).expanduser().exists()):
            return cls(spec, default_split)
        if not split:  # 'SOURCE@' means the default split
            return cls(source, default_split)
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}' in '{spec}'; use {', '.join(SPLITS[:-1])} or {SPLITS[-1]}")
        return cls(source, split)

    def describe(self) -> str:
        return f"{self.source} ({self.split} split)"


def is_local_file(source: str) -> bool:
    """Whether a spec's source names a file (anything not built-in or on the hub)."""
    return not (source.startswith(("builtin:", HF_PREFIX)) or source in HUB_SOURCES)


def eval_command_spec(spec: str) -> str:
    """The spec `prunetune eval` scores: a local file without a split is the user's test set, scored
    whole (`@all`); `@eval` picks the held-out tenth of a file that was also trained on. Built-in and
    hub sources keep their eval split."""
    data = DataSpec.parse(spec, default_split="")
    return f"{data.source}@{data.split or ('all' if is_local_file(data.source) else 'eval')}"


# ---------------------------------------------------------------------------------------------
# Sources -> documents


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))]


def _record_to_example(record: dict, where: str) -> Example:
    if not isinstance(record, dict):
        raise UserError(f"{where}: records must be JSON objects, found {type(record).__name__}")
    if "text" in record:
        return Example(response=str(record["text"] or ""))
    if "instruction" in record and "output" in record:
        extra = str(record.get("input") or "")
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if extra else "",
            instruction=record["instruction"],
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return Example(prompt=prompt, response=str(record["output"]))
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in raw):
            raise UserError(f"{where}: 'messages' must be a list of objects with 'role' and 'content'")
        messages = tuple((m["role"], m["content"]) for m in raw)
        if not messages or messages[-1][0] != "assistant":
            raise UserError(f"{where}: a chat record must end with an assistant message")
        return Example(messages=messages)
    raise UserError(f"{where}: records need a 'text' field, 'instruction'/'output' fields, or 'messages'")


# How much of a text file is read to tell text from a binary file before all of it is tokenised.
SNIFF_BYTES = 64 * 1024


def _check_text(path: Path) -> None:
    """Refuse a file that is not UTF-8 text (a binary file, or text in another encoding such as UTF-16)
    from its first 64 KiB: NUL bytes, or bytes that do not decode."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        raise UserError(f"{path}: not text (it holds NUL bytes at offset {head.index(0)}: a binary file, or "
                        "UTF-16 text); pass a UTF-8 text file")
    try:  # incremental: a character cut at the end of the 64 KiB is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start}: a binary file, or "
                        "another encoding); pass a UTF-8 text file, or convert it (iconv -t UTF-8)") from None


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None


def _file_examples(path: Path) -> list[Example]:
    if path.suffix != ".parquet":
        _check_text(path)
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [Example(response=doc) for doc in text.split("\n\n") if doc.strip()]
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(_read_utf8(path).splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    elif path.suffix == ".json":
        try:
            records = json.loads(_read_utf8(path) or "[]")
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(records, dict):
            records = records.get("data", [records])
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a list of records (or an object with a 'data' list), "
                            f"found {type(records).__name__}")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: cannot read as Parquet ({reason})") from None
    return [_record_to_example(r, str(path)) for r in records]


def _hub_examples(source: str, split: str) -> list[Example]:
    if split == "all" and source != "alpaca":  # alpaca has one split, held out like a file
        return _hub_examples(source, "train") + _hub_examples(source, "eval")
    from datasets import load_dataset

    try:
        if source == "wikitext2":
            ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test" if split == "eval" else "train")
            return [Example(response=t) for t in ds["text"]]
        if source == "ptb":
            ds = load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", revision="refs/convert/parquet",
                              split="validation" if split == "eval" else "train")
            return [Example(response=t) for t in ds["sentence"]]
        if source == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            name = "validation" if split == "eval" else "train"
            ds = load_dataset("allenai/c4", data_files={name: files[name]}, split=name)
            return [Example(response=t) for t in ds["text"]]
        ds = load_dataset("tatsu-lab/alpaca", split="train")
        return [_record_to_example(r, "alpaca") for r in ds]
    except Exception as exc:  # datasets raises many types for "no network"; all mean the same here
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load '{source}' from the Hugging Face hub ({reason}); {OFFLINE_HINT}") from None


def _hf_examples(source: str, split: str) -> list[Example]:
    """`hf:OWNER/NAME[:CONFIG]`: train on its `train` split; evaluate on its `validation` split, or,
    when it has none, on the held-out last 10% of its train records (then train on the rest); `all`
    reads both."""
    name, _, config = source[len(HF_PREFIX):].partition(":")
    owner, slash, dataset = name.partition("/")
    if not (owner and slash and dataset) or "/" in dataset:
        raise UserError(f"'{source}' is not a hub dataset; write hf:OWNER/NAME or hf:OWNER/NAME:CONFIG")
    from datasets import load_dataset

    try:
        splits = load_dataset(name, config or None)  # a DatasetDict of every split, cached after once
        if "train" not in splits:
            raise UserError(f"'{source}' has no train split (it has {', '.join(splits) or 'none'}); "
                            "use a dataset with a train split")
        own_eval = "validation" in splits
        names = {"train": ["train"], "eval": ["validation" if own_eval else "train"],
                 "all": ["train", "validation"] if own_eval else ["train"]}[split]
        examples = []
        for records in (splits[name] for name in names):
            columns = records.column_names
            if "text" in columns:
                examples += [Example(response=t or "") for t in records["text"]]
            elif {"instruction", "output"} <= set(columns) or "messages" in columns:
                examples += [_record_to_example(r, source) for r in records]
            else:
                raise UserError(f"'{source}' has no 'text' column (columns: {', '.join(columns)}); "
                                "use a dataset with a text column or instruction/chat records")
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for "no network"; all mean the same here
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load '{source}' from the Hugging Face hub ({reason}); {OFFLINE_HINT}") from None
    examples = _non_empty(examples, source)
    return examples if own_eval else _held_out(examples, split)


def _held_out(examples: list[Example], split: str) -> list[Example]:
    """Deterministic split: the last 10% of documents, or of lines when there are few documents."""
    if split == "all":
        return examples
    if len(examples) >= 10:
        cut = len(examples) - max(1, round(len(examples) * EVAL_FRACTION))
        return examples[cut:] if split == "eval" else examples[:cut]
    if not all(e.is_plain_text for e in examples):
        raise UserError(f"need at least 10 records to hold out an evaluation split, found {len(examples)}")
    lines = "\n\n".join(e.response for e in examples).split("\n")
    # Blank lines at either end (a file's final newline) would otherwise be all a split gets.
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    cut = len(lines) - max(1, round(len(lines) * EVAL_FRACTION))
    part = lines[cut:] if split == "eval" else lines[:cut]
    return [Example(response="\n".join(part))]


def load_examples(spec: str | DataSpec, default_split: str = "train") -> list[Example]:
    """The records of one split of a source, in a fixed order."""
    data = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec, default_split)
    source = data.source
    if source == "builtin:pydoc":
        examples = [Example(response=d) for d in _pydoc_documents()]
    elif source == "builtin:stdlib-code":
        examples = [Example(response=d) for d in _stdlib_documents()]
    elif source in HUB_SOURCES:
        examples = _hub_examples(source, data.split)
        if source != "alpaca":  # the hub sets bring their own splits
            return _non_empty(examples, source)
    elif source.startswith(HF_PREFIX):
        return _non_empty(_hf_examples(source, data.split), f"{source} ({data.split} split)")
    elif source.startswith("builtin:"):
        raise UserError(f"unknown built-in source '{source}'; use {' or '.join(OFFLINE_SOURCES)}")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            raise UserError(f"no such data file: '{source}' is a directory; pass one {'/'.join(FILE_SUFFIXES)} "
                            "file")
        if path.suffix not in FILE_SUFFIXES:
            raise UserError(
                f"unknown data source '{source}'; use {', '.join(OFFLINE_SOURCES + HUB_SOURCES)}, "
                f"hf:OWNER/NAME[:CONFIG] or a {'/'.join(FILE_SUFFIXES)} file"
            )
        if not path.is_file():
            raise UserError(f"no such data file: '{source}'")
        examples = _file_examples(path)
    examples = _non_empty(examples, source)
    return _non_empty(_held_out(examples, data.split), f"{source} ({data.split} split)")


def _non_empty(examples: list[Example], what: str) -> list[Example]:
    examples = [e for e in examples if e.messages is not None or (e.prompt + e.response).strip()]
    if not examples:
        raise UserError(f"the corpus '{what}' is empty; {OFFLINE_HINT}")
    return examples


# ---------------------------------------------------------------------------------------------
# Documents -> token stream -> blocks


@dataclass
class TokenStream:
    ids: torch.Tensor  # int64 [N]
    loss_mask: torch.Tensor  # bool [N]: True where the token is a training target

    def __len__(self) -> int:
        return len(self.ids)


def _chat_parts(example: Example, tokenizer) -> tuple[str, str]:
    history = [{"role": r, "content": c} for r, c in example.messages[:-1]]
    answer = example.messages[-1][1]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    return prompt, answer


def tokenize(examples: list[Example], tokenizer) -> TokenStream:
    """Plain text is joined with blank lines and tokenised as one text (the published perplexity
    protocol); instruction and chat records are tokenised one by one, each closed by EOS, with the
    loss on the response only."""
    if all(e.is_plain_text for e in examples):
        ids = tokenizer("\n\n".join(e.response for e in examples), return_tensors="pt").input_ids[0]
        return TokenStream(ids.long(), torch.ones(len(ids), dtype=torch.bool))
    pieces, masks = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for e in examples:
        prompt, response = _chat_parts(e, tokenizer) if e.messages is not None else (e.prompt, e.response)
        # A chat template already wrote its special tokens; adding BOS again would double it.
        p = tokenizer(prompt, add_special_tokens=e.messages is None).input_ids if prompt else []
        r = tokenizer(response, add_special_tokens=not prompt).input_ids + eos
        pieces.append(torch.tensor(p + r, dtype=torch.long))
        masks.append(torch.tensor([False] * len(p) + [True] * len(r)))
    return TokenStream(torch.cat(pieces), torch.cat(masks))


def pack(stream: TokenStream, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping blocks of `seq_len` tokens; the tail that does not fill a block is dropped."""
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(f"the text has {len(stream)} tokens, fewer than one block of {seq_len}; "
                        "use a shorter --seq-len or more data")
    ids = stream.ids[: n * seq_len].view(n, seq_len)
    mask = stream.loss_mask[: n * seq_len].view(n, seq_len)
    return ids, mask


def load_blocks(spec: str, tokenizer, seq_len: int, default_split: str = "train", max_blocks: int | None = None):
    """`(input_ids [N, seq_len], loss_mask [N, seq_len])` for one split of a source."""
    if max_blocks is not None and max_blocks < 1:
        raise UserError(f"the number of windows must be at least 1, got {max_blocks}")
    blocks, mask = pack(tokenize(load_examples(spec, default_split), tokenizer), seq_len)
    if max_blocks is not None:
        blocks, mask = blocks[:max_blocks], mask[:max_blocks]
    return blocks, mask
