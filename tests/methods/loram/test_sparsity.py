"""Unstructured and 2:4 sparsity (LoRAM unst/semi): masks, Wanda scores, KeepZeros, counting, errors."""

import copy

import pytest
import torch
from tiny import ARCHITECTURES, tiny_model, tokens

from prunetune.errors import UserError
from prunetune.importance.wanda import input_norms
from prunetune.methods.loram.wanda_unstructured import sparsify, wanda_scores
from prunetune.methods.loram.sparsity import (
    KeepZeros,
    apply_sparsity,
    check_pattern,
    keep_mask,
    reduction_ratio,
    sparsity_summary,
)
from prunetune.structure.units import PROJECTIONS, decoder_layers, projection
from prunetune.training.loop import TrainSettings, train


def calib(n: int = 2):
    return [tokens(2, 16, seed=s) for s in range(n)]


def weights(model):
    return {(i, name): projection(layer, name).weight for i, layer in enumerate(decoder_layers(model))
            for name in PROJECTIONS}


def assert_top(keep: torch.Tensor, scores: torch.Tensor, m: int | None = None) -> None:
    """Every kept score is at least every pruned score of its row (or of its group of m)."""
    keep, scores = (keep, scores) if m is None else (keep.reshape(-1, m), scores.reshape(-1, m))
    inf = torch.tensor(float("inf"))
    lowest_kept = torch.where(keep, scores, inf).amin(dim=1)
    highest_pruned = torch.where(~keep, scores, -inf).amax(dim=1)
    assert (lowest_kept >= highest_pruned - 1e-5 * scores.abs().max()).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patterns_exact_on_every_architecture(arch):
    for pattern, ratio in (("unst", 0.3), ("semi", 0.5)):
        model = tiny_model(arch)
        masks = sparsify(model, pattern, ratio, batches=calib())
        assert set(masks) == set(weights(model))  # default: every layer
        for key, weight in weights(model).items():
            assert torch.equal(masks[key], weight != 0)
            zeros = weight == 0
            if pattern == "unst":
                assert (zeros.sum(dim=1) == round(0.3 * weight.shape[1])).all(), key
            else:
                assert (zeros.reshape(weight.shape[0], -1, 4).sum(dim=2) == 2).all(), key
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=tokens()).logits).all()


def test_wanda_scores_by_hand():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5], [-0.1, 0.2, -4.0, 1.0]]))
    x = torch.tensor([[3.0, 0.0, 0.0, 4.0], [4.0, 1.0, 0.1, 3.0]])  # input norms 5, 1, 0.1, 5
    norms = torch.tensor([sum(float(x[t, j]) ** 2 for t in range(2)) ** 0.5 for j in range(4)])
    scores = wanda_scores(linear.weight, x.norm(dim=0))
    expected = [[abs(float(linear.weight.detach()[i, j])) * float(norms[j]) for j in range(4)] for i in range(2)]
    assert torch.allclose(scores, torch.tensor(expected))  # [[5, 2, .3, 2.5], [.5, .2, .4, 5]]
    # Wanda keeps what magnitude would drop (row 0: 3.0 · 0.1 loses to 0.5 · 5), per row.
    assert keep_mask(scores, "unst", 0.5).tolist() == [[True, False, False, True], [True, False, False, True]]
    assert keep_mask(linear.weight.abs(), "unst", 0.5).tolist() == [[False, True, True, False],
                                                                    [False, False, True, True]]
    assert keep_mask(scores, "semi", 0.5).tolist() == [[True, False, False, True], [True, False, False, True]]
    assert keep_mask(scores, "semi", 0.75, (1, 4)).tolist() == [[True, False, False, False],
                                                                [False, False, False, True]]


def test_wanda_norms_by_hand_and_sequential_inputs():
    """Layer 0 q_proj against norms computed by hand; in the sequential variant, layer i is scored on
    the inputs it has, dense, after the earlier layers were pruned, with its own attention mask (Qwen2
    with sliding-window layers)."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert len(set(model.config.layer_types)) == 2
    dense = copy.deepcopy(model)
    batches = calib()
    masks = sparsify(model, "unst", 0.5, batches=batches)
    with torch.no_grad():
        layer0 = decoder_layers(dense)[0]
        x = torch.cat([layer0.input_layernorm(dense.model.embed_tokens(b)).reshape(-1, 96) for b in batches])
        by_hand = torch.tensor([sum(float(v) ** 2 for v in x[:, j]) ** 0.5 for j in range(96)])
    assert_top(masks[(0, "q_proj")], wanda_scores(layer0.self_attn.q_proj.weight, by_hand))
    for i, layer in enumerate(decoder_layers(dense)):  # layer i dense, the layers before it pruned
        reference = copy.deepcopy(model)
        decoder_layers(reference)[i].load_state_dict(layer.state_dict())
        norms = input_norms(reference, batches)[i]
        for name in PROJECTIONS:
            assert_top(masks[(i, name)], wanda_scores(projection(layer, name).weight, norms[name]))
    one_pass = sparsify(copy.deepcopy(dense), "unst", 0.5, batches=batches, sequential=False)
    assert all(torch.equal(one_pass[(0, name)], masks[(0, name)]) for name in PROJECTIONS)
    assert not all(torch.equal(one_pass[key], masks[key]) for key in masks)  # later layers see other inputs


def test_magnitude_chosen_layers_and_bf16():
    model = tiny_model("llama").to(torch.bfloat16)
    dense = copy.deepcopy(model)
    masks = sparsify(model, "semi", criterion="magnitude", layers=[1, 3])
    assert {i for i, _ in masks} == {1, 3}
    for key, weight in weights(model).items():
        assert weight.dtype == torch.bfloat16
        if key in masks:
            assert_top(masks[key], weights(dense)[key].float().abs(), m=4)
            assert torch.equal(weight, weights(dense)[key] * masks[key])
        else:
            assert torch.equal(weight, weights(dense)[key])
    summary = sparsity_summary(model)
    assert summary["overall"]["sparsity"] == pytest.approx(0.25)  # half of the layers at 2:4
    assert summary["projections"]["down_proj"]["zeros"] == 2 * 96 * 48 // 2


def test_keep_zeros_through_full_training():
    model = tiny_model("llama")
    masks = sparsify(model, "unst", 0.5, criterion="magnitude")
    hooks = KeepZeros.from_zeros(model)
    assert len(hooks.pruned) == len(masks)
    assert all(torch.equal(pruned, ~masks[key]) for (_, pruned), key in zip(hooks.pruned, masks))
    control = copy.deepcopy(model)
    before = {key: w.detach().clone() for key, w in weights(model).items()}
    settings = TrainSettings(steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup=0.0, weight_decay=0.1)
    blocks = tokens(8, 16, seed=3)
    for m, h in ((model, hooks), (control, None)):
        m.requires_grad_(True)
        train(m, blocks, torch.ones_like(blocks, dtype=torch.bool), settings, hooks=h, progress=False)
    for key, weight in weights(model).items():
        keep = masks[key]
        assert (weight[~keep] == 0).all(), key
        assert (weight[keep] != before[key][keep]).float().mean() > 0.9, key  # the live weights trained
    revived = sum(int((w[~masks[key]] != 0).sum()) for key, w in weights(control).items())
    assert revived > 0  # without the hook AdamW brings pruned weights back


def test_summary_and_reduction_ratio():
    assert reduction_ratio(1000, 500) == 2.0
    assert reduction_ratio(1000, 500, bits=4) == 8.0  # NF4: a quarter of the bytes
    assert reduction_ratio(1000, 1000, bits=8) == 2.0
    model = tiny_model("mistral")
    total = sparsity_summary(model)["parameters"]["total"]
    sparsify(model, "unst", 0.5, criterion="magnitude")
    summary = sparsity_summary(model)
    projection_weights = 4 * (2 * 96 * 96 + 2 * 48 * 96 + 3 * 48 * 96)  # q, o; k, v (3 kv heads); gate, up, down
    assert summary["overall"] == {"zeros": projection_weights // 2, "nonzeros": projection_weights // 2,
                                  "total": projection_weights, "sparsity": 0.5}
    assert summary["parameters"] == {"total": total, "nonzero": total - projection_weights // 2}
    assert reduction_ratio(total, summary["parameters"]["nonzero"]) == total / (total - projection_weights // 2)


@pytest.mark.parametrize("pattern,ratio,n_m", [("unst", 0.0, (2, 4)), ("unst", 1.0, (2, 4)), ("unst", 1.5, (2, 4)),
                                               ("unst", -0.1, (2, 4)), ("semi", 0.3, (2, 4)), ("semi", 0.5, (4, 4)),
                                               ("dense", 0.5, (2, 4))])
def test_bad_patterns(pattern, ratio, n_m):
    with pytest.raises(UserError) as info:
        check_pattern(pattern, ratio, n_m)
    assert "\n" not in str(info.value)


def test_bad_inputs():
    model = tiny_model("qwen3")
    for kwargs in ({"criterion": "taylor"}, {"batches": None}, {"layers": [4]}):
        with pytest.raises(UserError):
            sparsify(model, "unst", 0.5, **kwargs)
    with pytest.raises(UserError, match="1:5 sparsity needs input widths divisible by 5"):
        sparsify(model, "semi", 0.8, n_m=(1, 5), criterion="magnitude", layers=[0])
    from prunetune.models import quantize_linear_layers

    masks = {(0, "q_proj"): torch.ones(96, 96, dtype=torch.bool)}
    quantize_linear_layers(model, "nf4", torch.float32, torch.device("cpu"))
    for call in (lambda: sparsify(model, "semi", criterion="magnitude"), lambda: apply_sparsity(model, masks),
                 lambda: KeepZeros(model, masks)):
        with pytest.raises(UserError, match="not an 8-bit or NF4 one") as info:
            call()
        assert "\n" not in str(info.value)


def test_sequential_wanda_on_middle_layers():
    model = tiny_model("mistral")
    dense = copy.deepcopy(model)
    masks = sparsify(model, "semi", batches=calib(), layers=[2, 1])
    assert sorted({i for i, _ in masks}) == [1, 2]
    for (i, name), weight in weights(model).items():
        assert torch.equal(weight, weights(dense)[(i, name)]) == (i not in (1, 2))
