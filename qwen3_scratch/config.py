"""Qwen3 configuration with the field names of Hugging Face's config.json, plus presets for released models."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Qwen3Config:
    vocab_size: int = 151_936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128  # not hidden_size / heads in Qwen3: 0.6B has 16 * 128 = 2048 != 1024
    max_position_embeddings: int = 40_960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    # MoE (Qwen3-MoE); num_experts == 0 means a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    bos_token_id: int | None = 151_643
    eos_token_id: int | list | None = 151_645
    model_type: str = "qwen3"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, source) -> "Qwen3Config":
        if isinstance(source, (str, Path)):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            source = json.loads(path.read_text())
        d = dict(source)
        if d.get("model_type") not in ("qwen3", "qwen3_moe"):
            raise ValueError(f"config.json has model_type={d.get('model_type')!r}; only 'qwen3' and 'qwen3_moe' are supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope scaling type {rope.get('rope_type', rope.get('type'))!r} is not implemented")
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if "num_local_experts" in d and "num_experts" not in d:
            d["num_experts"] = d["num_local_experts"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @classmethod
    def from_preset(cls, name: str) -> "Qwen3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


_MOE = dict(model_type="qwen3_moe", tie_word_embeddings=False, num_key_value_heads=4,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)
PRESETS = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                tie_word_embeddings=False),
    "30B-A3B": dict(_MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                    num_hidden_layers=48, num_attention_heads=32),
    "235B-A22B": dict(_MOE, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                      num_hidden_layers=94, num_attention_heads=64),
}
