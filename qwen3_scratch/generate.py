"""Autoregressive decoding: prefill, then one token at a time with the KV cache; greedy and sampling."""
import torch

from .kv_cache import KVCache


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). Greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                    eos_token_id=None, use_cache=True, attention_mask=None, generator=None):
    """Yield the next token ids (B,) one step at a time."""
    B, T = input_ids.shape
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context window "
                         f"max_position_embeddings={limit}")
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    cache = KVCache.for_model(model, B, T + max_new_tokens) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    seq, mask, step_in = input_ids, attention_mask, input_ids
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(step_in, attention_mask=mask, kv_cache=cache, last_only=True)[:, -1]
        else:
            logits = model(seq, attention_mask=mask, last_only=True)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos.numel():
            nxt = torch.where(done, eos[0], nxt)  # finished rows keep emitting the stop token
            done |= torch.isin(nxt, eos)
        yield nxt
        seq, step_in = torch.cat([seq, nxt[:, None]], dim=1), nxt[:, None]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if done.all():
            return


def generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
             use_cache=True, attention_mask=None, generator=None):
    """input_ids (B, T) -> (B, T + new) LongTensor."""
    new = list(stream_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                               use_cache, attention_mask, generator))
    return torch.cat([input_ids] + [t[:, None] for t in new], dim=1)
