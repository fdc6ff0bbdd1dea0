"""Importance criteria: shapes and ranges, and taylor and wanda-sp against brute-force references."""

import copy

import pytest
import torch
from tiny import ARCHITECTURES, tiny_model, tokens

from prunetune.errors import UserError
from prunetune.importance import CRITERIA, random_scores, taylor_scores, wanda_sp_scores
from prunetune.structure.units import PROJECTIONS, projection

HEAD_DIM = 16  # tiny.COMMON


def batches():
    return [tokens(seed=1), tokens(seed=2)]


def reference_units(layer, per_weight: dict[str, torch.Tensor]):
    """Per-unit sums of weight-shaped tensors, slice by slice (independent of `unit_sums`)."""
    q, k, v, o = (per_weight[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = (per_weight[n] for n in ("gate_proj", "up_proj", "down_proj"))
    heads = [slice(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in range(q.shape[0] // HEAD_DIM)]
    kv_heads = [slice(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in range(k.shape[0] // HEAD_DIM)]
    return (
        torch.stack([q[h].sum() + o[:, h].sum() for h in heads]),
        torch.stack([k[h].sum() + v[h].sum() for h in kv_heads]),
        torch.stack([gate[c].sum() + up[c].sum() + down[:, c].sum() for c in range(gate.shape[0])]),
    )


def assert_scores_close(scores, expected, rtol=1e-4):
    assert len(scores) == len(expected)
    for got, (q, kv, ch) in zip(scores, expected):
        torch.testing.assert_close(got.q_heads, q, rtol=rtol, atol=1e-7)
        torch.testing.assert_close(got.kv_heads, kv, rtol=rtol, atol=1e-7)
        torch.testing.assert_close(got.channels, ch, rtol=rtol, atol=1e-7)


def assert_same_scores(a, b):
    assert_scores_close(a, [(s.q_heads, s.kv_heads, s.channels) for s in b], rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_every_criterion_scores_every_unit(arch, criterion):
    model = tiny_model(arch, num_hidden_layers=2)
    scores = CRITERIA[criterion](model, batches(), seed=0)
    assert len(scores) == 2
    for s in scores:
        for t, n in ((s.q_heads, 6), (s.kv_heads, 3), (s.channels, 48)):
            assert t.shape == (n,) and t.dtype == torch.float32 and t.device.type == "cpu"
            assert torch.isfinite(t).all() and (t >= 0).all()
            if criterion == "random":
                assert (t < 1).all()
            else:
                assert (t > 0).any()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_taylor_matches_autograd_and_leaves_the_model_as_it_was(arch):
    model = tiny_model(arch, attention_dropout=0.5)  # dropout must be off while scoring
    data = batches()

    ref = copy.deepcopy(model).eval()
    weights = {(i, n): projection(layer, n).weight for i, layer in enumerate(ref.model.layers) for n in PROJECTIONS}
    for w in weights.values():
        w.requires_grad_(True)
    grads = {key: torch.zeros_like(w) for key, w in weights.items()}
    for b in data:
        loss = ref(input_ids=b, labels=b).loss
        for key, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            grads[key] += g
    expected = [
        reference_units(layer, {n: (weights[i, n] * grads[i, n]).abs().detach() for n in PROJECTIONS})
        for i, layer in enumerate(ref.model.layers)
    ]

    # A mixed state to come back to: frozen embeddings and one frozen projection, training mode.
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    model.train()
    before = {name: p.requires_grad for name, p in model.named_parameters()}

    assert_scores_close(taylor_scores(model, data), expected)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_taylor_through_a_peft_wrapper_scores_the_base_weights():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2", num_hidden_layers=2)
    data = batches()
    plain = taylor_scores(model, data)
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=list(PROJECTIONS), lora_dropout=0.1))
    before = {name: p.requires_grad for name, p in wrapped.named_parameters()}
    assert any(before.values()) and not all(before.values())  # LoRA trainable, base frozen

    assert_same_scores(taylor_scores(wrapped, data), plain)
    assert {name: p.requires_grad for name, p in wrapped.named_parameters()} == before
    assert all(p.grad is None for p in wrapped.parameters())


def input_norms_by_hooks(model, data):
    """Each projection's inputs caught by our own hooks, then the per-feature L2 norm over all tokens."""
    seen = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for n in PROJECTIONS:
            def hook(_m, args, key=(i, n)):
                seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            handles.append(projection(layer, n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in data:
            model(input_ids=b)
    for h in handles:
        h.remove()
    return {key: torch.cat(xs).norm(dim=0) for key, xs in seen.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_wanda_sp_matches_its_formula(arch):
    model = tiny_model(arch)
    data = batches()
    norms = input_norms_by_hooks(model, data)
    expected = [
        reference_units(layer, {n: projection(layer, n).weight.detach().abs() * norms[i, n][None, :]
                                for n in PROJECTIONS})
        for i, layer in enumerate(model.model.layers)
    ]
    scores = wanda_sp_scores(model, data)
    assert_scores_close(scores, expected)

    # By hand for layer 0's key/value heads: their input is the first norm of the embeddings.
    layer = model.model.layers[0]
    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(model.model.embed_tokens(b)).reshape(-1, 96) for b in data])
    norm = x.pow(2).sum(dim=0).sqrt()
    k, v = layer.self_attn.k_proj.weight.detach(), layer.self_attn.v_proj.weight.detach()
    by_hand = ((k.abs() * norm).reshape(3, -1).sum(1) + (v.abs() * norm).reshape(3, -1).sum(1))
    torch.testing.assert_close(scores[0].kv_heads, by_hand, rtol=1e-4, atol=0)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hooks are gone


def test_wanda_sp_follows_the_activations():
    # Amplify one hidden feature at the input of layer 0's MLP: the channels whose gate and up
    # rows weigh that feature most gain the most.
    model = tiny_model("mistral", num_hidden_layers=1)
    data = batches()
    base = wanda_sp_scores(model, data)[0].channels
    mlp = model.model.layers[0].mlp
    feature = 7
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[feature] *= 50
    louder = wanda_sp_scores(model, data)[0].channels
    assert (louder > base).all()
    weight_on_feature = mlp.gate_proj.weight[:, feature].abs() + mlp.up_proj.weight[:, feature].abs()
    assert torch.argmax(louder - base) == torch.argmax(weight_on_feature)


def test_wanda_sp_through_a_peft_wrapper_and_after_an_error():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", num_hidden_layers=2)
    data = batches()
    plain = wanda_sp_scores(model, data)
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=list(PROJECTIONS)))
    assert_same_scores(wanda_sp_scores(wrapped, data), plain)

    with pytest.raises(IndexError):
        wanda_sp_scores(model, [torch.full((1, 4), 10_000)])  # out of the vocabulary
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_random_is_seeded():
    model = tiny_model("qwen3", num_hidden_layers=2)
    a, b, c = random_scores(model, seed=0), random_scores(model, seed=0), random_scores(model, seed=1)
    assert_same_scores(a, b)
    assert not torch.equal(a[0].channels, c[0].channels)
    assert not torch.equal(a[0].channels, a[1].channels)  # layers differ too


@pytest.mark.parametrize("criterion", ["taylor", "wanda-sp", "lora-guided"])
def test_data_criteria_need_batches(criterion):
    model = tiny_model("llama", num_hidden_layers=1)
    for missing in (None, []):
        with pytest.raises(UserError, match="needs calibration data: set PruneSettings.data"):
            CRITERIA[criterion](model, missing)


def test_nf4_base_refuses_taylor_and_scores_with_wanda_sp_and_magnitude():
    from prunetune.importance import magnitude_scores
    from prunetune.models import quantize_linear_layers

    # Widths that are multiples of 64: bitsandbytes' CPU kernel needs whole quantization blocks.
    dense = tiny_model("llama", hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
                       intermediate_size=64, num_hidden_layers=2, vocab_size=96)
    model = copy.deepcopy(dense)
    quantize_linear_layers(model, "nf4", torch.float32, torch.device("cpu"))
    model.eval()
    data = batches()
    with pytest.raises(UserError, match="quantized"):
        taylor_scores(model, data)
    assert all(p.grad is None for p in model.parameters())

    magnitude = magnitude_scores(model)
    got, want = wanda_sp_scores(model, data), wanda_sp_scores(dense, data)
    for g, w in zip(got, want):  # NF4 rounds the weights: close to the dense scores, not equal
        for a, b in ((g.q_heads, w.q_heads), (g.kv_heads, w.kv_heads), (g.channels, w.channels)):
            assert ((a - b).abs() / b).max() < 0.1  # 0.03 measured; 0.25 when NF4 weights are misread
    # The forward repacks NF4 weights for the CPU kernel (bitsandbytes 0.50, AVX512-BF16); the
    # weights read after it must be the same ones.
    for a, b in zip(magnitude_scores(model), magnitude):
        torch.testing.assert_close(a.channels, b.channels, rtol=1e-2, atol=0)


def test_lora_guided_one_shot_matches_its_estimate_and_leaves_the_model_as_it_was():
    """With B = 0 the estimated weight gradient is ∂L/∂B·A; the adapter goes again, nothing merged."""
    from prunetune.importance import lora_guided_one_shot_scores
    from prunetune.importance.lora_guided import lora_guided_scores
    from prunetune.training.lora import LoraSettings, add_lora

    model = tiny_model("qwen2", num_hidden_layers=2)
    ids = batches()
    with torch.no_grad():
        before = model(input_ids=ids[0]).logits
    flags = [p.requires_grad for p in model.parameters()]
    got = lora_guided_one_shot_scores(model, ids, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[0]).logits, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any("lora" in name for name, _ in model.named_parameters())

    reference = copy.deepcopy(model)
    torch.manual_seed(3)
    peft_model = add_lora(reference, LoraSettings(dropout=0.0))
    for batch in ids:
        peft_model(input_ids=batch, labels=batch).loss.backward()
    assert_same_scores(got, lora_guided_scores(peft_model, normalize=False))
    again = lora_guided_one_shot_scores(model, ids, seed=3)
    assert_same_scores(got, again)  # seeded: the same adapter, the same scores
