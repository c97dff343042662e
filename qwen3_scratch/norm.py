"""RMSNorm as used by Qwen3: no mean subtraction, no bias, computed in float32 and cast back."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        dtype = x.dtype
        x = x.float()  # bf16 squares lose too much precision: normalize in fp32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)  # cast back *before* the scale, as the reference does

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
