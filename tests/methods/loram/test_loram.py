"""LoRAM's steps on a tiny model: prune (with its reduction ratio), align, train (NF4 on the CPU)."""

from pathlib import Path

import pytest
import torch
from helpers import assert_user_error, run_cli

from prunetune import load_model
from prunetune.training.lora import LoraSettings
from prunetune.methods.loram.pipeline import (
    LoramPruneSettings, StepOptions, align, prune_for_loram, recover, reduction_ratio, train_adapter,
)
from prunetune.runs.settings import RunOptions
from prunetune.report import read_record
from prunetune.structure.units import Structure, count_parameters
from prunetune.training.distill import DistillSettings
from prunetune.training.loop import TrainSettings


def quiet(_):
    pass


@pytest.fixture(scope="module")
def full(wide_model_dir):
    """A tiny Llama, hidden 128 so NF4's CPU kernels apply."""
    return wide_model_dir


@pytest.fixture(scope="module")
def pruned(full, tmp_path_factory):
    out = tmp_path_factory.mktemp("loram") / "pruned"
    prune_for_loram(str(full), out, LoramPruneSettings(ratio=0.5, seq_len=32, calib_samples=2),
                    RunOptions(progress=False), log=quiet)
    return out


def training(steps=3):
    return TrainSettings(steps=steps, batch_size=2, seq_len=32, lr=1e-3)


def test_reduction_ratio_is_the_papers_formula():
    assert reduction_ratio(100, 50) == 2.0
    assert reduction_ratio(100, 50, bits=4) == 8.0  # QLoRAM: NF4 base


def test_structured_prune_records_the_reduction_ratio(full, pruned):
    record = read_record(pruned)
    assert record["command"] == "loram prune" and record["loram"]["method"] == "stru"
    assert record["loram"]["criterion"] == "taylor"
    before, after = record["parameters"]["before"]["total"], record["parameters"]["after"]["total"]
    assert record["loram"]["reduction_ratio"] == pytest.approx(before / after)
    assert record["loram"]["original_parameters"] == before
    model, _ = load_model(str(pruned))
    assert count_parameters(model)["total"] == after


def test_align_trains_every_weight_and_carries_the_kept_units(full, pruned, tmp_path):
    out = tmp_path / "aligned"
    record = align(pruned, out, training(), StepOptions(progress=False), log=quiet)
    before, _ = load_model(str(pruned))
    after, _ = load_model(str(out))
    assert Structure.of(after).layers == Structure.of(before).layers
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
               if not torch.equal(a, b)]
    assert any("mlp.down_proj" in n for n in changed) and any("embed_tokens" in n for n in changed)
    stored = read_record(out)
    assert stored["kept"] == read_record(pruned)["kept"] and stored["loram"]["method"] == "stru"
    assert record["training"]["peak_memory_bytes"] > 0
    # distillation from the full model by default: its teacher is the model the pruned one came from
    assert stored["alignment"]["objective"] == "distillation"
    assert record["training"]["distill"]["teacher"] == str(full)
    assert record["training"]["distill"]["alpha"] == 1.0 and record["training"]["distill"]["teacher_model_bytes"] > 0


def test_distilled_alignment_from_a_teacher_cache_builds_it_once(full, pruned, tmp_path, short_text):
    """--teacher-cache: the full model's top-k is built on the first alignment and reused by the next,
    which trains to the same losses without loading the full model."""
    distill = DistillSettings(cache=str(tmp_path / "cache"), top_k=8)
    records = [align(pruned, tmp_path / name, training(), StepOptions(data=short_text, progress=False), log=quiet,
                     distill=distill)
               for name in ("built", "reused")]
    first, second = (r["training"]["distill"] for r in records)
    assert first["teacher"] == str(full) and first["teacher_cache"]["built"] and first["teacher_model_bytes"] is None
    assert not second["teacher_cache"]["built"]
    assert ([e["loss"] for e in records[0]["training"]["history"]]
            == [e["loss"] for e in records[1]["training"]["history"]])


def test_distilled_alignment_brings_the_pruned_model_closer_to_the_full_one(tiny_model_dir, tmp_path):
    """On the alignment text, the KL divergence to the full model falls with distillation, further than
    with next-token training on the same batches; --no-distill is the paper's next-token alignment."""
    import torch.nn.functional as F

    from prunetune.data import load_blocks
    from prunetune.training.distill import DistillSettings

    full = tiny_model_dir("llama", initializer_range=0.3)  # peaked next-token distributions to match
    pruned = tmp_path / "pruned"
    prune_for_loram(str(full), pruned, LoramPruneSettings(ratio=0.5, seq_len=32, calib_samples=2),
                    RunOptions(progress=False), log=quiet)
    teacher, tokenizer = load_model(str(full))
    text = load_blocks("builtin:pydoc", tokenizer, 32, default_split="train")[0][:8]

    def divergence(model_dir) -> float:
        model, _ = load_model(str(model_dir))
        with torch.no_grad():
            p = F.log_softmax(teacher(text).logits, -1)
            q = F.log_softmax(model(text).logits, -1)
        return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))

    settings = TrainSettings(steps=12, batch_size=2, seq_len=32, lr=1e-3)
    align(pruned, tmp_path / "kd", settings, StepOptions(progress=False), log=quiet)
    record = align(pruned, tmp_path / "lm", settings, StepOptions(progress=False), log=quiet,
                   distill=DistillSettings(enabled=False))
    assert record["alignment"]["objective"] == "next-token loss" and "distill" not in record["training"]
    assert divergence(tmp_path / "kd") < min(divergence(tmp_path / "lm"), divergence(pruned))


def test_qloram_trains_an_nf4_adapter_on_the_cpu(pruned, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    record = train_adapter(str(pruned), out, training(), LoraSettings(dropout=0.0),
                           StepOptions(progress=False, eval_data=["builtin:pydoc"], eval_seq_len=32, max_windows=2),
                           quant="nf4", log=quiet)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    params = record["parameters"]
    assert params["reduction_ratio"] == pytest.approx(params["original"] / (params["base"]["total"] * 4 / 16))
    assert record["results"]["perplexity"][0]["data"] == "builtin:pydoc"
    model, _ = load_model(str(pruned))
    PeftModel.from_pretrained(model, str(out))  # the adapter fits the pruned model it was trained on


@pytest.fixture(scope="module")
def adapter(pruned):
    out = pruned.parent / "adapter"
    train_adapter(str(pruned), out, training(), LoraSettings(dropout=0.0), StepOptions(progress=False), log=quiet)
    with torch.no_grad():  # a freshly trained 3-step adapter is nearly zero; make the update visible
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(out / "adapter_model.safetensors"))
        generator = torch.Generator().manual_seed(0)
        tensors = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in tensors.items()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def test_recovered_adapter_on_the_masked_full_model_equals_the_pruned_model_with_its_adapter(full, pruned, adapter,
                                                                                              tmp_path):
    from peft import PeftModel

    from prunetune.structure.masks import Masks, apply_masks
    from tiny import tokens

    out = tmp_path / "full-adapter"
    record = recover(adapter, pruned, str(full), out, log=quiet)
    assert record["structured"] and (out / "adapter_config.json").is_file()
    ids = tokens(vocab=1000, length=16)
    small, _ = load_model(str(pruned))
    expected = PeftModel.from_pretrained(small, str(adapter)).eval()(input_ids=ids).logits
    big, _ = load_model(str(full))
    masks = Masks.from_summary(read_record(pruned)["kept"], Structure.of(big))
    wrapped = PeftModel.from_pretrained(big, str(out)).eval()
    handles = apply_masks(wrapped, masks)
    got = wrapped(input_ids=ids).logits
    handles.remove()
    assert torch.allclose(got, expected, atol=1e-4)


def test_recover_with_merge_writes_the_full_model_peft_would_merge(full, pruned, adapter, tmp_path):
    from peft import PeftModel

    from tiny import tokens

    recover(adapter, pruned, str(full), tmp_path / "adapter", log=quiet)
    recover(adapter, pruned, str(full), tmp_path / "merged", merge=True, log=quiet)
    ids = tokens(vocab=1000, length=16)
    base, _ = load_model(str(full))
    expected = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()(input_ids=ids).logits
    merged, _ = load_model(str(tmp_path / "merged"))
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)


def test_semi_structured_path_keeps_its_zeros_and_recovers_unchanged(full, tmp_path):
    from safetensors.torch import load_file

    from prunetune.methods.loram.sparsity import sparsity_summary

    sparse = tmp_path / "semi"
    record = prune_for_loram(str(full), sparse, LoramPruneSettings(method="semi", seq_len=32, calib_samples=2),
                             RunOptions(progress=False), log=quiet)
    assert record["loram"]["structured"] is False and record["loram"]["sparsity"]["sparsity"] == 0.5
    aligned = tmp_path / "aligned"
    align(sparse, aligned, training(), StepOptions(progress=False), log=quiet)
    model, _ = load_model(str(aligned))
    assert sparsity_summary(model)["overall"]["sparsity"] == 0.5  # alignment did not revive pruned weights
    trained = train_adapter(str(aligned), tmp_path / "adapter", training(), LoraSettings(), StepOptions(progress=False),
                            log=quiet)
    params = trained["parameters"]
    assert params["reduction_ratio"] == pytest.approx(params["original"] / params["base"]["nonzero"])
    recover(tmp_path / "adapter", aligned, str(full), tmp_path / "full", log=quiet)
    before = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_loram_run_end_to_end_compares_every_configuration(full, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    command = ["loram", "run", full, "--ratio", "0.5", "--align-steps", "2", "--steps", "2", "--batch-size", "2",
               "--seq-len", "32", "--eval-seq-len", "32", "--max-windows", "2", "--baseline", "--out", out]
    # five steps, each a fresh process: more time than run_cli's single-command limit
    done = subprocess.run([sys.executable, "-m", "prunetune.cli", *map(str, command)], cwd=tmp_path, text=True,
                          capture_output=True, timeout=900, env=dict(os.environ, COLUMNS="120"))
    assert done.returncode == 0, done.stderr[-2000:]
    record = read_record(out)
    names = [r["configuration"] for r in record["comparison"]]
    assert names == ["full model, untouched", "full model + recovered LoRAM adapter",
                     "full model + LoRA trained on it (baseline)", "pruned model + its adapter (without recovery)"]
    assert all(r["in_domain"] > 0 and r["out_of_domain"] > 0 for r in record["comparison"])
    assert all(r["peak_memory_bytes"] > 0 for r in record["comparison"][1:])
    assert "share of the baseline's gain" in (out / "report.md").read_text()
    from huggingface_hub import ModelCard

    for step in ("pruned", "aligned", "adapter", "full-adapter", "baseline"):
        assert (out / step / "prunetune.json").is_file()
        card = ModelCard.load(out / step / "README.md")  # every step's output documents itself, the same way
        assert "loram" in card.data.tags and card.data.pipeline_tag == "text-generation"
        assert card.data.library_name == ("peft" if "adapter" in step or step == "baseline" else "prunetune")


@pytest.mark.slow  # the aligned run above covers the pipeline; this is its second path
def test_loram_run_without_alignment_trains_on_the_pruned_model(full, tmp_path):
    from prunetune.methods.loram.run import LoramRunSettings, loram_run

    out = tmp_path / "run"
    settings = LoramRunSettings(ratio=0.5, align_steps=0, steps=2, batch_size=2, seq_len=32, eval_seq_len=32,
                                max_windows=2)
    record = loram_run(full, out, settings, log=quiet)
    assert not (out / "aligned").exists()
    adapter = read_record(out / "adapter")
    assert Path(adapter["base_model"]).name == "pruned"
    assert "not aligned" in (out / "report.md").read_text()
    assert [r["configuration"] for r in record["comparison"]] == [
        "full model, untouched", "full model + recovered LoRAM adapter",
        "pruned model + its adapter (without recovery)"]


@pytest.mark.parametrize("args, fragment", [
    (("loram", "run", "{full}", "--align-steps", "0", "--ablation", "--out", "x"), "adapter already is that one"),
    (("loram", "run", "{full}", "--align-steps", "-1", "--out", "x"), "--align-steps must be at least 0"),
    (("loram", "prune", "{full}", "--method", "bogus", "--out", "x"), "unknown --method 'bogus'"),
    (("loram", "prune", "{full}", "--method", "semi", "--ratio", "0.3", "--out", "x"), "semi"),
    (("loram", "recover", "{full}", "--pruned", "{full}", "--full", "{full}", "--out", "x"),
     "not a prunetune run directory"),
])
def test_loram_mistakes_are_one_line_errors(full, tmp_path, args, fragment, no_model_load):
    done = run_cli(*(str(a).format(full=full) for a in args), cwd=tmp_path)
    assert_user_error(done, fragment)
    assert not (tmp_path / "x").exists()
