"""Modules: own parameters and gradients, compose the ops, backward in reverse order."""
from .attention import KVCache, MultiHeadAttention, RowLayout, merge_heads, split_heads
from .block import Block
from .encoder_decoder import EncoderDecoder, TransformerDecoder, TransformerEncoder
from .layers import (
    Dropout, Embedding, FeedForward, LayerNorm, Linear, PositionalEmbedding, SinusoidalPositionalEncoding,
)
from .convert import apply_lora, quantize_linears
from .lora import LoRALinear, lora_parameters, merge_lora, unmerge_lora
from .module import Module, ModuleList
from .quant import FrozenLinear, QuantizedLinear, dequantize_int8, quantize_int8

__all__ = [
    "EncoderDecoder", "TransformerDecoder", "TransformerEncoder",
    "Block", "Dropout", "Embedding", "FeedForward", "FrozenLinear", "KVCache", "LayerNorm", "Linear", "LoRALinear",
    "Module", "ModuleList", "QuantizedLinear", "apply_lora", "dequantize_int8", "lora_parameters", "merge_lora", "quantize_int8",
    "quantize_linears", "unmerge_lora",
    "MultiHeadAttention", "PositionalEmbedding", "RowLayout", "SinusoidalPositionalEncoding", "merge_heads", "split_heads",
]
