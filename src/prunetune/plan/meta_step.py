"""A training step run on the meta device, its tensor memory counted: memory from shapes alone.

The memory of a training step depends on shapes, dtypes and settings, not on the weights' values. On
the meta device every operator computes its output's shape and dtype and allocates nothing, so the
project's own step (PEFT's LoRA, the chunked loss or the distillation loss, gradient checkpointing,
AdamW, LoRAPrune's criterion) runs on a 70B-shaped model in seconds. `TensorMemory(device="meta")`
counts each storage it creates and frees exactly as it does on the CPU, where the two agree to the
byte (tests/plan/test_plan.py). Five things are adjusted while a step is planned (`planning()`):

- transformers asks whether the positions are packed sequences, which reads values; training
  blocks never are, so the answer is fixed to "no".
- On the meta device scaled-dot-product attention would take the math path and keep each layer's
  attention matrix; the CPU and GPU both run a flash kernel, which keeps the output and the
  log-sum-exp only (and handles grouped key/value heads without repeating them). The planned step
  calls that kernel's meta function.
- A mixture's experts run through torch's grouped product, whose meta function takes bf16 only; at
  other dtypes a stand-in gives the same output and keeps the same tensors for the backward.
- PEFT (0.21 and later) folds a LoRA on a mixture's experts into their weight inside `torch.autocast(enabled=False)`,
  which has no meta device; on meta the same `baddbmm` runs without that guard.
- bitsandbytes weights (8-bit, NF4) do not run on the meta device. A quantized projection is
  planned as its packed weight and quantization constants, plus a dequantized copy of the weight
  that exists only while that projection computes, forward and backward, as bitsandbytes does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from ..training.tensor_memory import TensorMemory

META = torch.device("meta")


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """The adjustments above, undone on exit."""
    import transformers.masking_utils as masking_utils

    original_sdpa = F.scaled_dot_product_attention

    def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    import transformers.integrations.moe as moe

    original_grouped = moe._grouped_mm

    def grouped_mm(input, weight, offs):
        if weight.device.type != "meta" or weight.dtype == torch.bfloat16:
            return original_grouped(input, weight, offs)
        return _MetaGroupedMM.apply(input.to(weight.dtype), weight, offs)

    try:  # PEFT 0.21 and later fold a LoRA on a whole parameter (a mixture's experts) into one baddbmm
        from peft.tuners.lora.layer import _LoraFactorsProxy  # under autocast, which the meta device lacks
    except ImportError:  # earlier PEFT adds the update as a tensor of its own, which runs on the meta device
        _LoraFactorsProxy = None

    original_fold = getattr(_LoraFactorsProxy, "forward", None)

    def fold(proxy, W):
        if W.device.type != "meta":
            return original_fold(proxy, W)
        return torch.baddbmm(W, proxy.lhs, proxy.rhs, alpha=proxy.scaling)

    with contextlib.ExitStack() as replaced:  # each one put back on exit
        replaced.enter_context(mock.patch.object(F, "scaled_dot_product_attention", flash_sdpa))
        replaced.enter_context(mock.patch.object(masking_utils, "find_packed_sequence_indices",
                                                 lambda position_ids: None))
        replaced.enter_context(mock.patch.object(moe, "_grouped_mm", grouped_mm))
        if _LoraFactorsProxy is not None:
            replaced.enter_context(mock.patch.object(_LoraFactorsProxy, "forward", fold))
        yield


class _MetaGroupedMM(torch.autograd.Function):
    """torch's grouped product (a mixture's experts) on the meta device at any dtype: its meta function
    takes bf16 only. Same output, and the same saved tensors as its autograd formula: the input only
    when the weight needs a gradient, as for any product (a frozen expert's input is not kept)."""

    @staticmethod
    def forward(ctx, input, weight, offs):
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        ctx.shapes = input.shape, weight.shape
        return input.new_empty(input.shape[0], weight.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        input_shape, weight_shape = ctx.shapes
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        return (grad.new_empty(input_shape) if needs_input else None,
                grad.new_empty(weight_shape) if needs_weight else None, None)


def meta_memory(tensors) -> TensorMemory:
    return TensorMemory(tensors, device="meta")


# ----------------------------------------------------------------------------------- quantized bases
QUANT_BYTES = {
    # bytes per weight of the packed weight, and of its quantization constants
    # 8bit: int8 weight, one fp32 scale per output row (SCB)
    # nf4 with double quantization (QLoRA's, prunetune's): 4-bit weight; per 64 weights an 8-bit absmax,
    # per 256 absmaxes one fp32 scale (and a 256-entry fp32 code table per weight)
    "8bit": 1.0,
    "nf4": 0.5,
}


class _Int8Linear(torch.autograd.Function):
    """y = x Wᵀ as bitsandbytes' LLM.int8() product runs it: int8 arithmetic on the packed weight (no
    de-quantized copy), in fp16: the input's fp16 copy is kept for the backward, and the output (and
    in the backward the gradient) pass through fp16 copies (measured on the CPU)."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = shape
        ctx.kept = x.to(torch.float16)
        out = torch.empty(*x.shape[:-1], shape[0], dtype=torch.float16, device=x.device)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        ctx.kept = None
        grad16 = grad.to(torch.float16)
        grad_x = torch.empty(*grad.shape[:-1], ctx.shape[1], dtype=torch.float16, device=grad.device)
        del grad16
        return grad_x.to(grad.dtype), None


class _DequantizedLinear(torch.autograd.Function):
    """y = x Wᵀ with W made for the product and dropped after it, in the forward and again in the
    backward (bitsandbytes keeps only the packed weight for the backward)."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = shape
        weight = torch.empty(shape, dtype=x.dtype, device=x.device)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        weight = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ weight, None


def plan_quantized(linear: nn.Linear, quant: str, compute_dtype: torch.dtype) -> None:
    """Make a Linear (on the meta device) hold and compute what a bitsandbytes Linear8bitLt / Linear4bit
    does: its weight becomes the packed bytes and constants, its forward the dequantizing product. It
    stays an nn.Linear, so PEFT wraps it as it wraps any projection."""
    shape = (linear.out_features, linear.in_features)
    numel = shape[0] * shape[1]
    linear.weight = nn.Parameter(torch.empty(0, dtype=compute_dtype, device=META), requires_grad=False)
    linear.register_buffer("packed", torch.empty(int(numel * QUANT_BYTES[quant]), dtype=torch.uint8, device=META))
    if quant == "8bit":
        linear.register_buffer("scales", torch.empty(shape[0], dtype=torch.float32, device=META))
    else:
        blocks = -(-numel // 64)
        linear.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=META))
        linear.register_buffer("absmax_scales", torch.empty(-(-blocks // 256), dtype=torch.float32, device=META))
        linear.register_buffer("code", torch.empty(256, dtype=torch.float32, device=META))
    linear.planned_shape = shape

    product = _Int8Linear if quant == "8bit" else _DequantizedLinear

    def forward(x):
        out = product.apply(x.to(compute_dtype), shape)
        return out if linear.bias is None else out + linear.bias

    linear.forward = forward


def planned_dense_weight(module: nn.Module) -> torch.Tensor:
    """`structure.units.dense_weight` for planned projections: a quantized one's dequantized copy, as
    LoRAPrune's criterion makes it (one projection at a time)."""
    from ..structure.units import base_linear, dense_weight

    base = base_linear(module)
    shape = getattr(base, "planned_shape", None)
    if shape is None:
        return dense_weight(module)
    return torch.empty(shape, dtype=base.weight.dtype, device=META)


def quantize_projections(model: nn.Module, quant: str, compute_dtype: torch.dtype) -> None:
    """Every decoder projection planned as `load_model(quant=...)` quantizes it."""
    from ..structure.units import decoder_layers, layer_projections, projection

    for layer in decoder_layers(model):
        for name in layer_projections(layer):
            plan_quantized(projection(layer, name), quant, compute_dtype)


def quant_state_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for m in model.modules() if hasattr(m, "planned_shape")
               for b in m.buffers(recurse=False))
