"""Modules: own parameters and gradients, compose the ops, backward in reverse order."""
from .attention import KVCache, MultiHeadAttention, merge_heads, split_heads
from .block import Block
from .layers import (
    Dropout, Embedding, FeedForward, LayerNorm, Linear, PositionalEmbedding, SinusoidalPositionalEncoding,
)
from .module import Module

__all__ = [
    "Block", "Dropout", "Embedding", "FeedForward", "KVCache", "LayerNorm", "Linear", "Module",
    "MultiHeadAttention", "PositionalEmbedding", "SinusoidalPositionalEncoding", "merge_heads", "split_heads",
]
