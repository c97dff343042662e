"""The Qwen3 decoder (dense and MoE in one class): embedding, N pre-norm blocks, final norm, LM head."""
import torch
from torch import nn

from .attention import Qwen3Attention
from .config import Qwen3Config
from .mlp import SwiGLU
from .moe import Qwen3MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


class Qwen3Block(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                        cfg.head_dim, cfg.rms_norm_eps, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = Qwen3MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                cfg.num_experts_per_tok, cfg.norm_topk_prob)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):  # (B, T, D) -> (B, T, D)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_mask(T, past, attention_mask=None, device=None):
    """Bool mask (B|1, 1, T, past+T), True where query slot may attend key slot; None when plain causal works."""
    if attention_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    q_slot = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (k_slot <= q_slot)[None]  # (1, T, S)
    if attention_mask is not None:
        # left padding: never attend to pad slots, but let every query see itself so no row is all -inf
        mask = (mask & attention_mask[:, None, :S].bool()) | (k_slot == q_slot)  # (B, T, S)
    return mask[:, None]  # (B|1, 1, T, S)


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, two uses

    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None, last_only=False):
        """input_ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only).
        attention_mask (B, past+T): 1 for real tokens, 0 for (left) padding. kv_cache: a KVCache or None."""
        B, T = input_ids.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # positions count real tokens only, so pads do not shift RoPE
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rotary(position_ids, dtype=x.dtype)  # (B, T, Dh)
        mask = build_mask(T, past, attention_mask, input_ids.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, T, V)
