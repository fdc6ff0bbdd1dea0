"""prunetune.methods.sheared.domains: parsing domains, per-domain blocks, the domain sampler; data.py's hf: source."""

from __future__ import annotations

import pytest
import torch

from prunetune.data import load_examples
from prunetune.methods.sheared.domains import DomainSampler, load_domain_blocks, parse_domains
from prunetune.errors import UserError
from prunetune.training.loop import TrainSettings


def one_line_user_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


def write_yaml(tmp_path, text: str, name: str = "domains.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


YAML = """
domains:
  code:  {data: builtin:stdlib-code, weight: 0.6, reference: 1.9}
  prose: {data: builtin:pydoc, weight: 0.4}
  web:   {data: "hf:allenai/c4:en", weight: 0.2}
scaling_law:
  - {parameters: 1.3e9, losses: {code: 1.2, prose: 2.0, web: 2.5}}
  - {parameters: 2.7e9, losses: {code: 1.1, prose: 1.9, web: 2.4}}
  - {parameters: 7.0e9, losses: {code: 1.0, prose: 1.8, web: 2.3}}
"""


# ---------------------------------------------------------------------------------------------
# Parsing


def test_command_line_domains_have_equal_weights():
    domains = parse_domains("code=builtin:stdlib-code,prose=builtin:pydoc")
    assert domains.names == ("code", "prose")
    assert [d.data for d in domains.domains] == ["builtin:stdlib-code", "builtin:pydoc"]
    assert torch.allclose(domains.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert domains.references == {} and domains.scaling_points == ()


def test_command_line_weights_and_references_override():
    domains = parse_domains("code=builtin:stdlib-code,prose=builtin:pydoc", "code=3,prose=1", "prose=2.2")
    assert torch.allclose(domains.weights, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert domains.references == {"prose": 2.2}


def test_yaml_domains_and_scaling_points(tmp_path):
    domains = parse_domains(write_yaml(tmp_path, YAML))
    assert domains.names == ("code", "prose", "web")
    assert domains.domains[2].data == "hf:allenai/c4:en"
    assert torch.allclose(domains.weights, torch.tensor([0.5, 1 / 3, 1 / 6], dtype=torch.float64))
    assert domains.references == {"code": 1.9}
    assert [size for size, _ in domains.scaling_points] == [1.3e9, 2.7e9, 7.0e9]
    assert domains.scaling_points[0][1] == {"code": 1.2, "prose": 2.0, "web": 2.5}


def test_command_line_overrides_the_yaml_file(tmp_path):
    domains = parse_domains(write_yaml(tmp_path, YAML), weights="web=0.4", references="code=1.5,web=2.0")
    assert torch.allclose(domains.weights, torch.tensor([0.6, 0.4, 0.4], dtype=torch.float64) / 1.4)
    assert domains.references == {"code": 1.5, "web": 2.0}


def test_yaml_shorthand_and_default_weight(tmp_path):
    domains = parse_domains(write_yaml(tmp_path, "domains:\n  code: builtin:stdlib-code\n"
                                                 "  prose: {data: builtin:pydoc}\n"))
    assert [d.weight for d in domains.domains] == [1.0, 1.0]


@pytest.mark.parametrize("spec, weights, references, expected", [
    ("builtin:pydoc", None, None, "code=builtin:stdlib-code,prose=builtin:pydoc"),
    ("", None, None, "no domains"),
    ("code=builtin:pydoc,code=builtin:stdlib-code", None, None, "named twice"),
    ("=builtin:pydoc", None, None, "empty name"),
    ("code=", None, None, "empty name or value"),
    ("code=builtin:pydoc,", None, None, "stray comma"),
    ("code=builtin:pydoc@eval", None, None, "drop the '@eval'"),
    ("code=builtin:pydoc@test", None, None, "unknown split"),
    ("code=builtin:pydoc", "prose=1", None, "unknown domain 'prose' in DomainSettings.weights"),
    ("code=builtin:pydoc", None, "prose=1", "unknown domain 'prose' in DomainSettings.references"),
    ("code=builtin:pydoc", "code=-1", None, "at least 0"),
    ("code=builtin:pydoc", "code=abc", None, "must be a number"),
    ("code=builtin:pydoc", "code=nan", None, "finite"),
    ("code=builtin:pydoc", "code0.5", None, "NAME=NUMBER"),
    ("code=builtin:pydoc,prose=builtin:stdlib-code", "code=0,prose=0", None, "all zero"),
    ("code=builtin:pydoc", None, "code=x", "must be a number"),
])
def test_command_line_mistakes(spec, weights, references, expected):
    with pytest.raises(UserError) as excinfo:
        parse_domains(spec, weights, references)
    assert expected in one_line_user_error(excinfo)


@pytest.mark.parametrize("text, expected", [
    ("domains: [code, prose]\n", "expected a mapping 'domains:'"),
    ("- code\n", "expected a mapping 'domains:'"),
    ("domains:\n  code: {data: builtin:pydoc}\nextra: 1\n", "unknown top-level key 'extra'"),
    ("domains:\n  code: {data: builtin:pydoc, weigth: 2}\n", "unknown key 'weigth'"),
    ("domains:\n  code: {weight: 2}\n", "needs a data spec"),
    ("domains:\n  code: 3\n", "must be a mapping"),
    ("domains:\n  code: {data: builtin:pydoc, weight: [1]}\n", "must be a number"),
    ("domains: {code: {data: builtin:pydoc}\n", "not valid YAML at line"),
    ("domains:\n  code: {data: builtin:pydoc}\nscaling_law: {parameters: 1}\n", "must be a list"),
    ("domains:\n  code: {data: builtin:pydoc}\nscaling_law:\n  - {parameters: 1e9}\n", "scaling_law point 1 must be"),
    ("domains:\n  code: {data: builtin:pydoc}\n  prose: {data: builtin:stdlib-code}\nscaling_law:\n"
     "  - {parameters: 1e9, losses: {code: 2}}\n", "no loss for domain 'prose'"),
    ("domains:\n  code: {data: builtin:pydoc}\nscaling_law:\n  - {parameters: 1e9, losses: {web: 2}}\n",
     "unknown domain 'web'"),
    ("domains:\n  code: {data: builtin:pydoc}\nscaling_law:\n  - {parameters: 1e9, losses: {code: 2}}\n"
     "  - {parameters: 2e9, losses: {code: 1.9}}\n", "at least 3"),
    ("domains:\n  code: {data: builtin:pydoc}\nscaling_law:\n  - {parameters: big, losses: {code: 2}}\n",
     "must be a number"),
])
def test_yaml_mistakes(tmp_path, text, expected):
    with pytest.raises(UserError) as excinfo:
        parse_domains(write_yaml(tmp_path, text))
    assert expected in one_line_user_error(excinfo)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError) as excinfo:
        parse_domains(str(tmp_path / "nowhere.yml"))
    assert "no such domains file" in one_line_user_error(excinfo)


def test_a_domain_with_a_given_reference_needs_no_scaling_points(tmp_path):
    text = ("domains:\n  code: {data: builtin:pydoc, reference: 1.0}\n  prose: {data: builtin:stdlib-code}\n"
            "scaling_law:\n" + "".join(f"  - {{parameters: {n}e9, losses: {{prose: {3 - n / 10}}}}}\n"
                                       for n in (1, 2, 4)))
    assert len(parse_domains(write_yaml(tmp_path, text)).scaling_points) == 3


# ---------------------------------------------------------------------------------------------
# Blocks


class CharTokenizer:
    """One token per character: enough for packing, with no download."""

    eos_token_id = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        class Out:
            input_ids = torch.tensor([[ord(c) % 96 for c in text]])
        return Out()


def test_load_domain_blocks_keeps_each_domain_s_rows(tmp_path):
    for name, letter in (("a", "x"), ("b", "y")):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(letter * 40 for _ in range(20)))
    domains = parse_domains(f"a={tmp_path / 'a.txt'},b={tmp_path / 'b.txt'}")
    train = load_domain_blocks(domains, CharTokenizer(), seq_len=16, split="train", max_blocks=5)
    held = load_domain_blocks(domains, CharTokenizer(), seq_len=16, split="eval")
    assert train.ranges == ((0, 5), (5, 10)) and train.blocks.shape == (10, 16)
    per = train.per_domain()
    x, y = ord("x") % 96, ord("y") % 96
    assert (per["a"][0] != y).all() and (per["a"][0] == x).any()
    assert (per["b"][0] != x).all() and (per["b"][0] == y).any()
    assert per["a"][1].all() and held.ranges == ((0, 5), (5, 10))  # 2 held-out paragraphs: 82 tokens


# ---------------------------------------------------------------------------------------------
# Sampling

RANGES = ((0, 10), (10, 13))  # domain 0: rows 0-9, domain 1: rows 10-12


def sampler(weights=(0.5, 0.5), batch_size=4, world=1, rank=0, seed=0, grad_accum=1, ranges=RANGES):
    settings = TrainSettings(batch_size=batch_size, seed=seed, grad_accum=grad_accum)
    return DomainSampler(ranges, settings, world, rank, torch.tensor(weights))


def draw(s: DomainSampler, steps: int, start: int = 0) -> list[list[int]]:
    return [s.rows(step, micro).tolist() for step in range(start, steps) for micro in range(s.settings.grad_accum)]


def domain_of(row: int) -> int:
    return 0 if row < 10 else 1


def test_sampler_is_deterministic_for_a_seed():
    assert draw(sampler(seed=3), 20) == draw(sampler(seed=3), 20)
    assert draw(sampler(seed=3), 20) != draw(sampler(seed=4), 20)


def test_proportions_follow_the_weights():
    rows = [r for batch in draw(sampler((0.8, 0.2), batch_size=8), 250) for r in batch]
    share = sum(domain_of(r) == 0 for r in rows) / len(rows)
    assert abs(share - 0.8) < 0.03


def test_each_domain_uses_every_block_once_per_epoch():
    rows = [r for batch in draw(sampler((1.0, 0.0), batch_size=5), 4) for r in batch]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # reshuffled for the next epoch


def test_one_process_with_2b_equals_two_processes_with_b():
    for accum in (1, 2):
        single = draw(sampler(batch_size=4, grad_accum=accum), 12)
        first = draw(sampler(batch_size=2, world=2, rank=0, grad_accum=accum), 12)
        second = draw(sampler(batch_size=2, world=2, rank=1, grad_accum=accum), 12)
        assert single == [a + b for a, b in zip(first, second)]


def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    whole = sampler(grad_accum=2)
    expected = draw(whole, 10)
    part = sampler(grad_accum=2)
    draw(part, 4)
    part.set_weights(torch.tensor([0.3, 0.7]))
    state = part.state_dict()
    whole = sampler(grad_accum=2)
    draw(whole, 4)
    whole.set_weights(torch.tensor([0.3, 0.7]))
    expected = draw(whole, 10, start=4)
    resumed = sampler(grad_accum=2)
    resumed.load_state_dict(state)
    assert draw(resumed, 10, start=4) == expected


def test_a_fresh_sampler_with_fixed_weights_skips_ahead():
    assert draw(sampler(), 9, start=5) == draw(sampler(), 9)[5:]


def test_the_same_micro_batch_twice_gives_the_same_rows_and_the_past_is_refused():
    s = sampler()
    first = s.rows(0, 0)
    assert torch.equal(first, s.rows(0, 0))
    s.rows(1, 0)
    with pytest.raises(ValueError):
        s.rows(0, 0)


def test_changed_weights_change_the_mix():
    s = sampler((0.5, 0.5))
    draw(s, 5)
    s.set_weights(torch.tensor([0.0, 1.0]))
    assert torch.allclose(s.weights, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert all(domain_of(r) == 1 for batch in draw(s, 15, start=5) for r in batch)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError):
        sampler((0.0, 0.0))
    with pytest.raises(ValueError):
        sampler().set_weights(torch.tensor([-1.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# data.py: the hf:OWNER/NAME[:CONFIG] source


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answered from memory; records which (name, config) were asked."""
    import datasets

    calls = []
    tables = {}

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        if name not in tables:
            raise ConnectionError("Couldn't reach 'https://huggingface.co' (offline)")
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns)
                                     for split, columns in tables[name].items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def test_hf_source_uses_its_own_validation_split(fake_hub):
    tables, calls = fake_hub
    tables["me/set"] = {"train": {"text": [f"train {i}" for i in range(5)]},
                        "validation": {"text": ["held 0", "held 1"]}}
    assert [e.response for e in load_examples("hf:me/set:en")] == [f"train {i}" for i in range(5)]
    assert [e.response for e in load_examples("hf:me/set:en@eval")] == ["held 0", "held 1"]
    assert calls[0] == ("me/set", "en")


def test_hf_source_without_validation_holds_out_the_last_tenth(fake_hub):
    tables, calls = fake_hub
    tables["me/set"] = {"train": {"text": [f"doc {i}" for i in range(20)], "id": list(range(20))}}
    assert [e.response for e in load_examples("hf:me/set", default_split="eval")] == ["doc 18", "doc 19"]
    assert len(load_examples("hf:me/set")) == 18
    assert calls[0] == ("me/set", None)


def test_hf_source_with_instruction_records(fake_hub):
    tables, _ = fake_hub
    tables["me/chat"] = {"train": {"instruction": [f"say {i}" for i in range(10)],
                                   "output": [str(i) for i in range(10)]}}
    examples = load_examples("hf:me/chat")
    assert examples[0].response == "0" and "say 0" in examples[0].prompt


@pytest.mark.parametrize("spec, expected", [
    ("hf:me/absent", "Hugging Face hub"),
    ("hf:me/notext", "no 'text' column"),
    ("hf:me/evalonly", "no train split"),
    ("hf:justname", "hf:OWNER/NAME"),
    ("hf:a/b/c", "hf:OWNER/NAME"),
])
def test_hf_source_mistakes(fake_hub, spec, expected):
    tables, _ = fake_hub
    tables["me/notext"] = {"train": {"content": ["x"] * 10}}
    tables["me/evalonly"] = {"test": {"text": ["x"] * 10}}
    with pytest.raises(UserError) as excinfo:
        load_examples(spec)
    message = one_line_user_error(excinfo)
    assert expected in message
    if expected == "Hugging Face hub":
        assert "builtin:pydoc" in message and "me/absent" in message
