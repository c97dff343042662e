"""Grouped-query attention with Qwen3's per-head RMSNorm on q and k (applied before RoPE)."""
import math
import torch
from torch import nn
import torch.nn.functional as F

from .norm import RMSNorm
from .rope import apply_rope


def attention_eager(q, k, v, mask=None):
    """Readable attention. q (B, H, T, Dh); k, v (B, K, S, Dh) with H a multiple of K;
    mask: bool (B|1, 1, T, S), True = may attend; None = causal (T == S).
    Returns out (B, H, T, Dh) and the attention probabilities (B, H, T, S)."""
    B, H, T, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K  # query heads per KV head
    qg = q.view(B, K, G, T, Dh)  # (B, K, G, T, Dh)
    # k[:, :, None] is a view (B, K, 1, S, Dh): broadcasting shares each KV head with its G query heads, no copy
    scores = qg @ k[:, :, None].transpose(-1, -2) / math.sqrt(Dh)  # (B, K, G, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    else:
        mask = mask[:, :, None] if mask.dim() == 4 else mask  # (B, 1, 1, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # softmax in fp32
    out = probs @ v[:, :, None]  # (B, K, G, T, Dh)
    return out.reshape(B, H, T, Dh), probs.reshape(B, H, T, S)


class Qwen3Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 rms_norm_eps: float = 1e-6, layer_idx: int = 0):
        super().__init__()
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a positive multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        head_dim = head_dim or hidden_size // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim, self.layer_idx = num_heads, num_kv_heads, head_dim, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps)  # per head: normalizes each Dh vector
        self.k_norm = RMSNorm(head_dim, rms_norm_eps)
        self.record_weights = False  # chapter 10: set True to keep the attention map in .last_weights
        self.last_weights = None

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        """x (B, T, D); cos/sin (B, T, Dh); mask bool (B, 1, T, S) or None (causal) -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, K, T, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, Dh): everything cached so far
        if self.record_weights:
            out, probs = attention_eager(q, k, v, mask)
            self.last_weights = probs.detach()
        else:
            causal = mask is None and T > 1
            if causal and k.shape[2] != T:
                raise ValueError("a causal query block shorter than the keys needs an explicit mask")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*Dh) -> (B, T, D)
