"""Helpers shared by the tests: tiny random transformers models (porting their weights is qwen3_scratch.hf_port)."""
import torch


def tiny_kwargs(moe=False, **over):
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=1e6,
              tie_word_embeddings=not moe, rms_norm_eps=1e-6)
    if moe:
        kw.update(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                  mlp_only_layers=[1], decoder_sparse_step=1)
    kw.update(over)
    return kw


def tiny_hf_model(moe=False, seed=0, std=0.1, **over):
    """A random transformers Qwen3 / Qwen3-MoE causal LM in fp32 with eager attention."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    kw = tiny_kwargs(moe, **over)
    cfg = (Qwen3MoeConfig if moe else Qwen3Config)(attn_implementation="eager", **kw)
    model = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(cfg).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and is tiny; random everything tests more
        for p in model.parameters():
            p.normal_(0, std)
    return model
