"""Models compose modules: GPT (decoder-only)."""
from .gpt import GPT, PRESETS, GPTConfig, normalize_gpt2_state_dict

__all__ = ["GPT", "GPTConfig", "PRESETS", "normalize_gpt2_state_dict"]
