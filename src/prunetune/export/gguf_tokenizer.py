"""The tokenizer part of a GGUF file: what llama.cpp needs to tokenize exactly as transformers does.

Only byte-level BPE tokenizers are written (llama.cpp's `gpt2` tokenizer model: SmolLM/SmolLM2, Llama 3,
Qwen2/2.5/3, Mistral Nemo). For those llama.cpp re-implements each family's pre-tokenizer regex and
picks it by the name in `tokenizer.ggml.pre`. That name is not in the Hugging Face files, so we find
it the way llama.cpp's own converter does: tokenize a fixed text and look the hash of the ids up in a
table of known tokenizers (below, from llama.cpp's conversion/base.py `get_vocab_base_pre`). A model
read from a GGUF file keeps the name that file gives. SentencePiece-style tokenizers (Llama 2,
Mistral 7B) are refused rather than written with made-up scores.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from ..errors import UserError

# llama.cpp's check text (convert_hf_to_gguf_update.py); the hash is of str(tokenizer.encode(text)).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Hash -> pre-tokenizer name, for the tokenizers of the architectures prunetune prunes.
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, 2.5, 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
SUPPORTED = "the byte-level BPE tokenizers of SmolLM2, Llama 3, Qwen2/2.5/3 and Mistral Nemo"

# gguf.TokenType values (written as plain ints).
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4


def _is_byte_level(tokenizer_json: dict) -> bool:
    """A BPE model whose pre-tokenizer (alone or in a Sequence) is ByteLevel: llama.cpp's `gpt2` model."""
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        return False
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(part.get("type") == "ByteLevel" for part in parts)


def pre_tokenizer_name(encode) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer, given its `encode` (special tokens added)."""
    digest = sha256(str(list(encode(CHECK_TEXT))).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise UserError(f"this tokenizer's pre-tokenizer is not one llama.cpp is known to implement (hash "
                        f"{digest[:12]}); GGUF export supports {SUPPORTED}; export with --format hf instead")
    return KNOWN_PRE_TOKENIZERS[digest]


def check_tokenizer_files(directory: Path) -> None:
    """Refuse a model directory whose tokenizer GGUF export cannot write, before any weights load."""
    file = Path(directory) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"'{directory}' has no tokenizer.json; GGUF export embeds the tokenizer, so save one with "
                        "tokenizer.save_pretrained(dir)")
    from tokenizers import Tokenizer

    text = file.read_text(encoding="utf-8")
    if not _is_byte_level(json.loads(text)):
        raise UserError(f"the tokenizer in '{directory}' is not byte-level BPE; GGUF export supports {SUPPORTED}; "
                        "export with --format hf instead")
    # The Rust tokenizer applies the same post-processor (e.g. Llama 3's BOS) as transformers' encode.
    rust = Tokenizer.from_str(text)
    pre_tokenizer_name(lambda check_text: rust.encode(check_text).ids)


def add_tokenizer(writer, tokenizer, n_vocab: int, pre: str | None = None) -> dict:
    """Write `tokenizer` into a GGUFWriter: tokens, types, merges, special ids, chat template.

    `n_vocab`: the embedding's rows; ids the tokenizer lacks are written as unused `[PADn]` tokens
    (Qwen2 pads its embedding beyond the tokenizer). `pre`: the pre-tokenizer name when known (a
    source GGUF's); otherwise found by hash. Returns {"model": "gpt2", "pre": name}.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if not _is_byte_level(backend):
        raise UserError(f"this model's tokenizer is not byte-level BPE; GGUF export supports {SUPPORTED}; "
                        "export with --format hf instead")
    pre = pre or pre_tokenizer_name(tokenizer.encode)

    vocab = tokenizer.get_vocab()  # base and added tokens
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has only "
                        f"{n_vocab} rows; save the model with its own tokenizer")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])  # byte-level form (Ġ for a space), as llama.cpp expects
        types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(backend))
    writer.add_add_space_prefix(False)

    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Whether encode adds BOS/EOS, read from what it does (Llama 3 adds BOS, SmolLM2 and Qwen do not).
    with_special, without = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    writer.add_add_bos_token(len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(with_special) > len(without) and with_special[-1] == tokenizer.eos_token_id)

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: GGUF keeps them as a list of {name, template}
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)
    return {"model": "gpt2", "pre": pre}


def _merges(backend: dict) -> list[str]:
    """The BPE merges as "left right" strings (the format llama.cpp reads)."""
    merges = backend["model"].get("merges") or []
    if merges and isinstance(merges[0], str):
        return list(merges)
    # Newer tokenizers store pairs; a space inside a part becomes U+0120 (Ġ), as gguf.vocab writes it.
    return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
            for pair in merges]
