"""FP8 linear layers for inference, applied to a DiT by one function.

`float8_linears(dit)` swaps the linear layers of every transformer block
(self-attention q/k, both cross-attentions, the MLP; the self-attention's
values and output stay, see KEEP_IN_DTYPE) for `Float8Linear`:
the weight stored once in e4m3 with an fp32 scale per output channel, the
input quantized per token on the fly (`kernels.quantize_fp8_rows`, Triton on
CUDA), one scaled matrix product (`torch._scaled_mm`). On Hopper that product
runs at twice the bf16 rate and reads half the weight bytes. The MLP's GELU
goes into the quantization of its hidden activation, so the MLP launches no
GELU kernel.

What stays in its own dtype: the patch embedding, the timestep and text
embeddings, the adaLN tables and the head (small, or where the output is
formed), and every norm, RoPE and attention. The model code is unchanged: it
calls `self.q(x)` and gets an FP8 product. Inference only (no gradients).
"""

from __future__ import annotations

import torch
from torch import nn

from streamgen import kernels
from streamgen.model.model import DiT, FeedForward


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Float8Linear(nn.Module):
    """An nn.Linear's product in FP8: weight [N, K] in e4m3 with per-row scales, inputs
    quantized per row. `gelu_input`: the layer applies GELU-tanh to its input first (fused)."""

    def __init__(self, linear: nn.Linear, gelu_input: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu_input = gelu_input
        weight_q, weight_scale = kernels.reference.quantize_fp8_rows(linear.weight.detach())
        # parameters that take no gradient: weights to whoever counts them (bench/floor.py);
        # like any module's, a later .to(dtype) would cast them, so convert after it
        self.weight_q = _frozen(weight_q)
        self.weight_scale = _frozen(weight_scale.t().contiguous())  # [1, N]
        self.bias = None if linear.bias is None else _frozen(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Float8Linear is for inference: its e4m3 weight has no gradient")
        return kernels.fp8_linear(x, self.weight_q, self.weight_scale, self.bias, gelu=self.gelu_input)

    def extra_repr(self) -> str:
        gelu = ", gelu_input=True" if self.gelu_input else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3{gelu}"


class Float8FeedForward(nn.Module):
    """`FeedForward` with both linears in FP8 and its GELU inside the second's quantization."""

    def __init__(self, ffn: FeedForward):
        super().__init__()
        self.up = Float8Linear(ffn.up)
        self.down = Float8Linear(ffn.down, gelu_input=True)

    def forward(self, x):
        return self.down(self.up(x))


def check_float8_device(device, dtype: torch.dtype) -> None:
    """A ValueError saying why FP8 products cannot run here (CUDA: sm_89 or later, bf16)."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(
                f"FP8 linears need an sm_89 or later GPU (Ada, Hopper); this one is sm_{capability[0]}{capability[1]}"
            )
        if dtype != torch.bfloat16:
            raise ValueError(f"FP8 linears on CUDA produce bfloat16; the model is {dtype}")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"FP8 linears run on CUDA and CPUs, not {device.type}")


def _aligned(linear: nn.Linear) -> bool:
    # the tensor cores' FP8 products take K and N in multiples of 16
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


# The self-attention's values and output projection stay in the model's dtype: the value path
# feeds the KV cache, so its error comes back in every later chunk. Measured on tiny-avatar
# (`streamgen bench fp8`, 12 chunks against float32): every block linear in FP8, 42.7 dB PSNR;
# all but these two, 50.1 dB; bfloat16 alone, 53.6 dB. In wan2.1-1.3b they are 10% of the
# linear layers' FLOPs.
KEEP_IN_DTYPE = ("self_attn.v", "self_attn.o")
ATTENTIONS = ("self_attn", "cross_attn", "audio_attn")


def float8_linears(dit: DiT, keep: tuple[str, ...] = KEEP_IN_DTYPE) -> DiT:
    """Swap the linear layers of every block of `dit` for FP8 ones, in place; returns `dit`.

    keep: the layers, named within a block ("self_attn.v", "cross_attn.q", "ffn"), that stay in
    the model's dtype. Call it after the weights are loaded and the model is on its device and
    dtype. Layers whose sizes the FP8 products cannot take (not multiples of 16) stay too."""
    param = next(dit.parameters())
    check_float8_device(param.device, param.dtype)
    for block in dit.blocks:
        for attn_name in ATTENTIONS:
            attn = getattr(block, attn_name)
            for name in ("q", "k", "v", "o") if attn is not None else ():
                layer = getattr(attn, name)
                if f"{attn_name}.{name}" not in keep and isinstance(layer, nn.Linear) and _aligned(layer):
                    setattr(attn, name, Float8Linear(layer))
        ffn = block.ffn
        if "ffn" not in keep and isinstance(ffn, FeedForward) and _aligned(ffn.up) and _aligned(ffn.down):
            block.ffn = Float8FeedForward(ffn)
    return dit


def float8_layers(module: nn.Module) -> int:
    """How many FP8 linear layers `module` holds."""
    return sum(isinstance(m, Float8Linear) for m in module.modules())
