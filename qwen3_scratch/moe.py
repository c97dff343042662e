"""Sparse mixture-of-experts feed-forward (Qwen3-MoE): softmax router over all experts, top-k, renormalize."""
import torch
from torch import nn
import torch.nn.functional as F

from .mlp import SwiGLU


class Qwen3MoE(nn.Module):
    def __init__(self, hidden_size: int, moe_intermediate_size: int, num_experts: int, num_experts_per_tok: int,
                 norm_topk_prob: bool = True):
        super().__init__()
        if not 0 < num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) must be in 1..num_experts ({num_experts})")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, num_experts_per_tok, norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(SwiGLU(hidden_size, moe_intermediate_size) for _ in range(num_experts))

    def route(self, x):
        """x (N, D) -> router logits (N, E), weights (N, A), expert ids (N, A)."""
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # over *all* experts
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), experts

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        x = x.reshape(-1, D)  # (N, D)
        _, weights, experts = self.route(x)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():  # only the experts some token chose
            token, slot = torch.where(experts == e)
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(B, T, D)

    def forward_dense(self, x):
        """Run every expert on every token and mix with the (mostly zero) routing weights: readable, slow."""
        B, T, D = x.shape
        x = x.reshape(-1, D)
        _, weights, experts = self.route(x)
        dense_w = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        dense_w.scatter_(1, experts, weights)  # (N, E)
        all_out = torch.stack([expert(x) for expert in self.experts], dim=1)  # (N, E, D)
        return (dense_w[..., None] * all_out).sum(1).view(B, T, D)
