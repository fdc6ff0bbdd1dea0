"""The model card every output directory gets: a Hugging Face `README.md` with YAML metadata, so that
`huggingface-cli upload` publishes a documented model, and a reader of the directory sees what it is.

The metadata follows the Hub's conventions (`base_model`, `library_name`, `tags`, `pipeline_tag`,
`license`); the text gives the run's key facts from its prunetune.json: parameters and perplexity
before and after (with the protocol that makes the numbers comparable), the method and its settings,
the exact command, and how to load and serve the result. An adapter directory keeps the card PEFT
wrote (`library_name: peft`), with prunetune's facts added.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

# The Hub id of each built-in alias's model, for `base_model` (the alias itself is not a Hub id).
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# A method's tag on the Hub, by the `method` or `command` its record names.
METHOD_TAGS = {"loraprune": "loraprune", "sheared": "sheared-llama", "continued pre-training": "sheared-llama",
               "loram": "loram"}
CARD_FILE = "README.md"


def write_card(directory: Path, record: dict, *, adapter: bool = False) -> Path:
    """Write (or, for a PEFT adapter, complete) DIRECTORY/README.md from the run's record."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(directory) / CARD_FILE
    method = _method(record)
    base = _base_model(record, adapter)
    tags = ["prunetune", method]
    if method != "loram":
        tags.append("pruned")
    if adapter:
        tags += ["lora", "peft"]
    existing = ModelCard.load(path) if adapter and path.is_file() else None
    data = existing.data if existing is not None else ModelCardData()
    data.library_name = "peft" if adapter else "prunetune"
    data.pipeline_tag = "text-generation"
    data.tags = list(dict.fromkeys([*(data.tags or []), *tags]))
    if base.hub_id:
        data.base_model = base.hub_id
    license_ = _license(base.spec)
    if license_ and not data.license:
        data.license = license_
    body = _body(record, method, base, adapter)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(path)
    return path


class _Base:
    """The model a run started from (or, for an adapter, the model to load it onto)."""

    def __init__(self, spec: str | None):
        self.spec = spec
        self.hub_id = _hub_id(spec)


def _method(record: dict) -> str:
    command = record.get("command", "")
    if command.startswith("loram"):
        return "loram"
    return METHOD_TAGS.get(record.get("method", ""), record.get("method") or command)


def _base_model(record: dict, adapter: bool) -> _Base:
    if adapter:
        return _Base(record.get("full_model") or record.get("base_model"))
    return _Base(record.get("source_model") or record.get("model") or record.get("source"))


def _hub_id(spec: str | None) -> str | None:
    """`spec` as a Hub id: the alias's model, a run directory's own base, or the spec when it is one."""
    if not spec:
        return None
    if spec in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[spec]
    path = Path(spec)
    if (path / "prunetune.json").is_file():  # a prunetune output: its card names the base already
        try:
            record = json.loads((path / "prunetune.json").read_text())
        except (OSError, ValueError):
            return None
        return _hub_id(record.get("source_model") or record.get("model"))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") != 1:
        return None  # a local model: it has no Hub id to link to
    return spec


def _license(spec: str | None) -> str | None:
    """The source's license where it is known without downloading weights: a local card's metadata, or a
    GGUF file's `general.license` (the built-in model's)."""
    if not spec:
        return None
    try:
        from ..models import resolve_model_spec

        source = resolve_model_spec(spec)
        if source.kind == "gguf":
            from gguf import GGUFReader

            field = GGUFReader(Path(source.path) / source.gguf_file).fields.get("general.license")
            return str(field.contents()) if field is not None else None
        if source.kind == "dir" and (Path(source.path) / CARD_FILE).is_file():
            from huggingface_hub import ModelCard

            return ModelCard.load(Path(source.path) / CARD_FILE).data.license
    except Exception:  # a card is documentation: a source without a readable license simply has none listed
        return None
    return None


def _number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _facts(record: dict) -> list[str]:
    rows: list[tuple[str, str]] = []
    params = record.get("parameters", {})
    before = params.get("before", {}).get("total") if isinstance(params.get("before"), dict) else None
    after = params.get("after", {}).get("total") if isinstance(params.get("after"), dict) else None
    if before and after:
        rows.append(("parameters", f"{before:,} → {after:,} ({after / before:.1%} kept)"))
    elif params.get("total"):
        rows.append(("parameters", f"{params['total']:,}"))
    elif isinstance(params.get("base"), dict):
        rows.append(("parameters of the base it trained on", f"{params['base']['total']:,}"))
    if "ratio_target" in params:
        rows.append(("pruning ratio (of the prunable parameters)",
                     f"target {params['ratio_target']:.2f}, achieved {params['ratio_achieved']:.3f}"))
    if "reduction_ratio" in params:
        rows.append(("parameter reduction ratio (LoRAM)", f"{params['reduction_ratio']:.2f}x"))
    results = record.get("results", {})
    ppl_before, ppl_after = results.get("perplexity_before"), results.get("perplexity_after")
    if ppl_before or ppl_after:
        protocol = ppl_after or ppl_before
        rows.append(("perplexity", f"{_number((ppl_before or {}).get('perplexity'))} → "
                                   f"{_number((ppl_after or {}).get('perplexity'))}"))
        rows.append(("perplexity protocol", _protocol(protocol)))
    for entry in results.get("perplexity", []) if isinstance(results.get("perplexity"), list) else []:
        rows.append((f"perplexity on {entry.get('data')}", f"{_number(entry.get('perplexity'))} ({_protocol(entry)})"))
    for name, value in (results.get("domain_perplexity") or {}).items():
        ppl = value.get("perplexity") if isinstance(value, dict) else value
        rows.append((f"perplexity on domain {name}", _number(ppl)))
    training = record.get("training")
    if isinstance(training, dict) and "steps" in training:
        rows.append(("training", f"{training['steps']} steps"
                                 + (f", {training['seconds']:.0f} s" if "seconds" in training else "")))
    if "elapsed_seconds" in record:
        rows.append(("run time", f"{record['elapsed_seconds']:.0f} s on {record.get('device', 'cpu')}"))
    lines = ["| | |", "|---|---|"]
    return lines + [f"| {name} | {value} |" for name, value in rows]


def _protocol(result: dict) -> str:
    parts = [f"data {result.get('data')}"]
    if "seq_len" in result:
        parts.append(f"{result['seq_len']}-token windows")
    if "windows" in result:
        parts.append(f"{result['windows']} windows")
    return ", ".join(parts)


def _command(record: dict) -> str:
    argv = record.get("argv") or []
    if argv and not argv[0].startswith("-") and Path(argv[0]).name.startswith(("pytest", "python")):
        return "(run from Python: see `settings` in prunetune.json)"
    return "prunetune " + shlex.join(str(a) for a in argv) if argv else "(run from Python)"


def _body(record: dict, method: str, base: _Base, adapter: bool) -> str:
    source = base.spec or "its source model"
    title = (f"A {method} adapter for {source}" if adapter
             else f"{source}, {'pruned with ' + method if method != 'sheared-llama' else 'sheared (Sheared-LLaMA)'}")
    settings = record.get("settings")
    sections = [
        f"# {title}", "",
        f"Made by [prunetune](https://pypi.org/project/prunetune/) {record.get('prunetune_version', '')} "
        f"(`{record.get('command')}`) on {record.get('created', '')}. Everything below comes from this "
        "directory's `prunetune.json`, which holds the whole record.", "",
        "## Key facts", "", *_facts(record), "",
        "## How it was made", "", "```sh", _command(record), "```", "",
    ]
    if settings:
        sections += ["Settings:", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    sections += ["## Load and serve", "", *(_adapter_usage(base) if adapter else _model_usage(record))]
    return "\n".join(sections) + "\n"


def loaders(record: dict) -> str:
    """What loads the model a run wrote, in a few words (the CLI's last line)."""
    from ..export.hf import VLLM_PLUGIN_MODEL_TYPES

    architecture = record.get("architecture", {})
    if architecture.get("stock_loadable", True):
        return "AutoModelForCausalLM.from_pretrained, vLLM"
    if architecture.get("saved_as", "llama") in VLLM_PLUGIN_MODEL_TYPES:
        return "prunetune.load_model, or vLLM with prunetune installed beside it"
    return ("prunetune.load_model only: vLLM and llama.cpp build this family with one shape in every layer, "
            "which --layers all gives")


def _model_usage(record: dict) -> list[str]:
    from ..export.gguf import WRITTEN_MODEL_TYPES
    from ..export.hf import VLLM_PLUGIN_MODEL_TYPES

    architecture = record.get("architecture", {})
    stock = architecture.get("stock_loadable", True)
    model_type = architecture.get("saved_as", "llama")
    lines = ["```python"]
    if stock:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("PATH")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    else:
        lines += ["# Its layers have different shapes: stock transformers cannot build it; prunetune can.",
                  "import prunetune", 'model, tokenizer = prunetune.load_model("PATH")']
    lines += ["```", "", "```sh"]
    if stock or model_type in VLLM_PLUGIN_MODEL_TYPES:
        lines.append("vllm serve PATH" + ("" if stock else "   # with prunetune installed: its vLLM plugin builds "
                                                           "the layers"))
    if model_type in WRITTEN_MODEL_TYPES:
        lines.append("prunetune export PATH --format gguf --outtype f16 --out model.gguf && llama-cli -m model.gguf")
    elif stock:
        lines.append("python convert_hf_to_gguf.py PATH --outfile model.gguf   # llama.cpp's converter")
    else:
        lines.append("# vLLM and llama.cpp build this family with one shape in every layer: prune with --layers all")
    return lines + ["```"]


def _adapter_usage(base: _Base) -> list[str]:
    model = base.hub_id or base.spec or "BASE"
    return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{model}")',
            'model = PeftModel.from_pretrained(base, "PATH")', "```", "", "```sh",
            f"vllm serve {model} --enable-lora --lora-modules adapter=PATH", "```"]
