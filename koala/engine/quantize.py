"""Weight-only bf16 and int8 for a target: fewer bytes per decode step, where a step reads every weight once.

`quantize_weights(model, "bf16")` rounds the weights of every linear layer of the decoder and the output head to
bfloat16 and keeps them in the model's dtype: the model computes in float32 on bf16 weights, as llama.cpp does with
a BF16 GGUF. Any GEMM runs it; koala's decode GEMM (koala.engine.gemm) stores such weights as bf16, so a step reads
half the bytes of float32 weights and computes in float32, on any CPU with AVX-512 (no bf16 matrix unit needed).

`quantize_weights(model, "int8")` replaces every linear layer of the decoder and the output head with an
`Int8Linear`: its weight stored as int8 per output channel (symmetric; the scale is the row's largest magnitude
/ 127) and run by torch's CPU weight-only kernel `aten._weight_int8pack_mm` on activations in the model's own dtype
(bfloat16: the kernel's float32 path is slower than full float32 weights). Norms, attention, the KV cache and the
embedding table (a row lookup) keep that dtype. Every step of up to 32 tokens, eager, compiled or ahead of time, runs
the same kernel; a longer prefill runs the dense GEMM on the dequantised weight (the same weights, rounded as a dense
GEMM rounds).

The bf16 and int8 targets are other models than the one they were made from: their greedy output can differ from
the full-precision target's. koala's guarantee holds against the target as it is run: speculative decoding of the
int8 target produces exactly the int8 target's own output (its autoregressive baseline is measured at int8 too),
and likewise at bf16.
`bench/weight_only_step.py` measures what the kernel saves on a machine, by step width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from koala.engine.compile import MAX_STEP_WIDTH
from koala.errors import KoalaError

WEIGHTS = ("full", "bf16", "int8")


class Int8Linear(nn.Module):
    """A linear layer's weight as int8 per output channel, its scales and bias in the activations' dtype.

    `weight` stays readable (the full-precision tensor it was made from) where `keep_source`: a draft vocabulary copies
    rows of the output head's weight, and a tied head's weight is the embedding table, kept anyway.
    """

    def __init__(self, linear: nn.Linear, keep_source: bool = False):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._source = [linear.weight] if keep_source else []  # a list: not a parameter of this module

    @property
    def weight(self) -> torch.Tensor:
        if not self._source:
            raise AttributeError("an int8 layer keeps no full-precision weight")
        return self._source[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # wider than any compiled step (a prefill): the dense GEMM on the dequantised weight, as the weight-only
        # kernel's cost grows with the rows far faster than a dense GEMM's; compiled steps always run the kernel
        if rows > MAX_STEP_WIDTH:
            return F.linear(x, self.qweight * self.scales[:, None], self.bias)  # one bf16 temporary, not two
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features), self.qweight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


def quantize_weights(hf_model: nn.Module, weights: str) -> int:
    """Quantise a loaded causal LM in place: `full` leaves it as it is; `bf16` rounds the weights of every nn.Linear
    of its decoder layers and its output head to bfloat16 (kept in the model's dtype, computed in it: a tied head
    rounds the embedding table with it); `int8` replaces those layers (CPU only). Returns how many layers changed."""
    if weights not in WEIGHTS:
        raise KoalaError(f"weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    if weights == "full":
        return 0
    if weights == "bf16":
        return _round_to_bf16(hf_model)
    device = hf_model.lm_head.weight.device if isinstance(hf_model.lm_head, nn.Linear) else None
    if device is not None and device.type != "cpu":
        raise KoalaError(f"int8 weights run on a CPU (torch's weight-only kernel), not on {device.type}: "
                         "use weights full (eval.weights: full) there")
    n = 0
    with torch.no_grad():
        for layer in hf_model.model.layers:
            for name, module in list(layer.named_modules()):
                if isinstance(module, nn.Linear):
                    parent, _, child = name.rpartition(".")
                    setattr(layer.get_submodule(parent) if parent else layer, child, Int8Linear(module))
                    n += 1
        if isinstance(hf_model.lm_head, nn.Linear):
            hf_model.lm_head = Int8Linear(hf_model.lm_head, keep_source=True)
            n += 1
    return n


def _round_to_bf16(hf_model: nn.Module) -> int:
    n = 0
    with torch.no_grad():
        for m in [*hf_model.model.layers.modules(), hf_model.lm_head]:
            w = m.weight if isinstance(m, nn.Linear) else None
            if w is not None:
                w.copy_(w.to(torch.bfloat16).to(w.dtype))
                n += 1
    hf_model.koala_weights = "bf16"  # what `weights_of` reports: the values alone cannot say
    return n


def weights_of(model: nn.Module) -> str:
    """`int8` or `bf16` for a model `quantize_weights` quantised (a Hugging Face model, or koala's engine over one);
    else `full`."""
    hf = model.hf_model[0] if hasattr(model, "hf_model") else model
    if any(isinstance(m, Int8Linear) for m in hf.model.layers.modules()):
        return "int8"
    return getattr(hf, "koala_weights", "full")
