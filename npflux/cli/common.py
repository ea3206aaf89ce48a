"""What several commands share: flags declared once, loading a model for text, printing samples."""
from __future__ import annotations

import sys


def add_backend_flag(p):
    p.add_argument("--backend", help="numpy or cupy (default: NPFLUX_BACKEND, else numpy)")


def add_sampling_flags(p, temperature=0.8):
    """--temperature, --top-k, --top-p, --seed: the sampling knobs of every command that generates."""
    p.add_argument("--temperature", type=non_negative_float, default=temperature,
                   help=f"softmax temperature (default {temperature}; 0: greedy)")
    p.add_argument("--top-k", type=positive_int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=unit_interval, help="sample among the most likely tokens holding this much "
                                                       "probability, in (0, 1]; 1 keeps every token")
    p.add_argument("--seed", type=int, help="seed of the sampler (default: fresh randomness)")


def _number(rule, ok):
    """An argparse type: a float that is finite and satisfies ``ok`` (nan passes every comparison unnoticed)."""
    import math
    from argparse import ArgumentTypeError

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise ArgumentTypeError(f"must be a finite number{rule}, got {text!r}")
        return value

    return parse


finite_float = _number("", lambda v: True)
positive_float = _number(" > 0", lambda v: v > 0)
non_negative_float = _number(" >= 0", lambda v: v >= 0)
unit_interval = _number(" in (0, 1]", lambda v: 0 < v <= 1)
fraction = _number(" in (0, 1)", lambda v: 0 < v < 1)
weight = _number(" in [0, 1]", lambda v: 0 <= v <= 1)


def positive_int(text):
    """An argparse type: a whole number >= 1."""
    from argparse import ArgumentTypeError

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def add_overwrite_flag(p, what="the checkpoint there"):
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} when another run wrote it (kept as a dated backup until the new "
                        f"checkpoint is complete)")


def unescape(text: str) -> str:
    """Backslash escapes of a command-line string turned into characters ('\\n' -> newline); the rest kept."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def print_sample(model, tokenizer, prompt, n, stop_at_eos=True, **kw):
    from ..backend import to_numpy
    from ..tokenizers import decode_text, encode_prompt

    ids = encode_prompt(tokenizer, prompt)
    eos = getattr(tokenizer, "eos_id", None) if stop_at_eos else None
    out = to_numpy(model.generate(model.backend.asarray([ids]), n, eos_id=eos, **kw))[0].tolist()
    if eos in out[len(ids):]:
        out = out[: out.index(eos, len(ids))]  # the document ended here
    print(decode_text(tokenizer, out))


def load_for_text(args):
    """(model, tokenizer) of --checkpoint on --backend; an exit with a message when it has no tokenizer."""
    from ..train import model_from_checkpoint

    model, tokenizer, ckpt = model_from_checkpoint(args.checkpoint, backend=args.backend)
    if tokenizer is None:
        sys.exit(f"{args.checkpoint} has no tokenizer; cannot encode text")
    return model, tokenizer
