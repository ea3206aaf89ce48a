"""npflux sample: text from a checkpoint, by sampling or beam search."""
from __future__ import annotations

import sys

from .common import add_backend_flag, add_sampling_flags, finite_float, load_for_text, positive_int, print_sample


def _sample(args):
    model, tokenizer = load_for_text(args)
    if args.prompt is None:  # a BPE model starts a document from [BOS] alone; a char model needs a character
        args.prompt = "" if getattr(tokenizer, "bos_id", None) is not None else "\n"
    if args.beam is not None:  # (--beam 0 is an error, not a silent switch to sampling)
        return _print_beams(model, tokenizer, args)
    for number in range(1, args.num_samples + 1):
        if args.num_samples > 1:  # (samples may hold blank lines of their own: a header says where each starts)
            print(f"=== sample {number} of {args.num_samples} ===")
        print_sample(model, tokenizer, args.prompt, args.max_new_tokens, stop_at_eos=not args.ignore_eos,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        args.seed = None if args.seed is None else args.seed + 1


def _print_beams(model, tokenizer, args):
    """The best --num-samples beams, best first; each beam's score goes to stderr."""
    from ..tokenizers import decode_text, encode_prompt

    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    if args.num_samples > args.beam:
        raise ValueError(f"--num-samples {args.num_samples} is more than the --beam {args.beam} beams kept")
    eos = None if args.ignore_eos else getattr(tokenizer, "eos_id", None)
    seqs, scores = model.beam_search(encode_prompt(tokenizer, args.prompt), beam_width=args.beam,
                                     max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                                     eos_id=eos)
    for rank, (seq, score) in enumerate(zip(seqs[: args.num_samples], scores)):
        print(f"[beam {rank + 1}: score {score:.4f}, {len(seq)} tokens]", file=sys.stderr)
        print(decode_text(tokenizer, seq.tolist()))


def add_parsers(sub):
    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. out/ckpt)")
    s.add_argument("--prompt", help="text to continue (default: a new document for BPE models, '\\n' for char)")
    s.add_argument("--max-new-tokens", type=positive_int, default=500, help="tokens to generate per sample (default 500)")
    add_sampling_flags(s, temperature=0.8)
    s.add_argument("--num-samples", type=positive_int, default=1, help="samples to draw (with --beam: best beams to show)")
    s.add_argument("--beam", type=int, metavar="WIDTH", help="beam search of this width instead of sampling")
    s.add_argument("--length-penalty", type=finite_float, default=1.0,
                   help="beam score = log-prob / length**PENALTY, PENALTY in [-10, 10] (default 1: mean log-prob per token)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past [EOS] (BPE models)")
    add_backend_flag(s)
    s.set_defaults(func=_sample)
