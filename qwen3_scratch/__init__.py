"""qwen3_scratch: Qwen3 built from scratch in PyTorch, exported from the course notebooks.

Hand-written (not generated): the public API, gathered from the generated modules.
"""
from .config import Qwen3Config
from .flash_attention import flash_attention, flash_decode  # registers attn_implementation="flash" (chapter 21)
from .generate import ChatSession, chat, generate, stream_generate
from .kv_cache import KVCache
from .model import Qwen3Model
from .quant import load_quantized, quantize_model, save_quantized
from .tokenizer import Qwen3Tokenizer
from .triton_attention import triton_flash_attention  # registers "triton"; imports triton only when a kernel runs
from .weights import load_pretrained, save_pretrained

__version__ = "0.1.0"
