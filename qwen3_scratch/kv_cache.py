"""A preallocated KV cache: one (L, B, K, max_len, Dh) buffer for keys and one for values."""
import torch


class KVCache:
    def __init__(self, num_layers, batch_size, max_len, num_kv_heads, head_dim, dtype=torch.float32, device=None):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0  # slots filled so far (same for every row and layer)

    @classmethod
    def for_model(cls, model, batch_size, max_len, dtype=None, device=None):
        cfg, p = model.config, next(model.parameters())
        return cls(cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim,
                   dtype or p.dtype, device or p.device)

    def update(self, layer_idx, k, v):
        """Write k, v (B, K, T, Dh) at slots pos..pos+T-1; return all keys/values so far (B, K, pos+T, Dh)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {T} tokens > max_len {self.max_len}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, T):
        self.pos += T

    def reset(self):
        self.pos = 0

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes
