"""The transformers <-> ours port (qwen3_scratch.hf_port): names and tensors both ways, logits both ways, dense and
MoE, dtype and device kept, RoPE frequencies kept in fp32."""
import pytest
import torch
from hf_ref import tiny_hf_model

from qwen3_scratch.hf_port import from_transformers, state_dict_from_hf, state_dict_to_hf, to_transformers

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))  # (B, T)
KINDS = {"dense": dict(moe=False), "moe": dict(moe=True),
         "moe, sparse step 2": dict(moe=True, decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=4)}


@pytest.fixture(scope="module", params=list(KINDS))
def hf(request):
    return tiny_hf_model(**KINDS[request.param])


def test_state_dict_round_trip_is_exact(hf):
    theirs = hf.state_dict()
    back = state_dict_to_hf(state_dict_from_hf(theirs))
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_experts_are_split_one_swiglu_each():
    hf = tiny_hf_model(moe=True)
    ours = state_dict_from_hf(hf.state_dict())
    fused = hf.state_dict()["model.layers.0.mlp.experts.gate_up_proj"]  # (E, 2I, D)
    I = fused.shape[1] // 2
    assert torch.equal(ours["layers.0.mlp.experts.3.gate_proj.weight"], fused[3, :I])
    assert torch.equal(ours["layers.0.mlp.experts.3.up_proj.weight"], fused[3, I:])
    assert not any(k.startswith("model.") for k in ours) and "lm_head.weight" in ours


@torch.no_grad()
def test_logits_both_ways(hf):
    ours = from_transformers(hf)
    assert (ours(IDS) - hf(IDS).logits).abs().max() <= 1e-5
    back = to_transformers(ours)
    assert type(back) is type(hf)
    assert (back(IDS).logits - ours(IDS)).abs().max() <= 1e-5


def test_tied_stays_tied_and_untied_stays_untied():
    tied, untied = from_transformers(tiny_hf_model(moe=False)), from_transformers(tiny_hf_model(moe=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_to_transformers_keeps_dtype_rope_in_fp32_and_no_stop_tokens():
    ours = from_transformers(tiny_hf_model(moe=False)).to(torch.bfloat16)
    hf = to_transformers(ours)
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(hf.model.rotary_emb.inv_freq, ours.rotary.inv_freq)
    assert hf.config.eos_token_id is None and hf.generation_config.pad_token_id == 0
    out = hf.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 5), "no eos: generates exactly max_new_tokens"
    with torch.no_grad():
        assert (hf(IDS).logits.float() - ours(IDS).float()).abs().max() <= 0.05, "bf16: close, not equal"
