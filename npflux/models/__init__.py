"""Models compose modules: GPT (decoder-only)."""
from .gpt import GPT, PRESETS, GPTConfig, load_gpt2_safetensors, normalize_gpt2_state_dict
from .reader import Reader, ReaderConfig
from .sae import SAEConfig, SparseAutoencoder
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer

__all__ = ["GPT", "GPTConfig", "PRESETS", "load_gpt2_safetensors", "normalize_gpt2_state_dict",
           "Reader", "ReaderConfig", "SAEConfig", "SparseAutoencoder", "Seq2SeqConfig", "Seq2SeqTransformer"]
