"""Rotary position embeddings, split-halves layout (rotate_half), theta = 1e6 in Qwen3."""
import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float = 1_000_000.0) -> torch.Tensor:
    # theta^(-2i/d) for i = 0 .. d/2-1, computed exactly as the reference does (int64 arange -> float32)
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 1_000_000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype=torch.float32):
        """position_ids (B, T) -> cos, sin each (B, T, Dh)."""
        angles = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh): both halves share a frequency
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin (B, T, Dh) -> (B, H, T, Dh)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
