"""npflux distill: a small GPT trained on a teacher's softened predictions (npflux.training.distill).

    npflux distill --teacher out-s2/ckpt --preset shakespeare-s1 [--temperature 2 --alpha 0.5] [--out-dir out-distill]
                   [--resume] [every training flag of npflux train]

The student reads the text with the teacher's tokenizer (the two must number
tokens alike) and documents are split as the teacher's were.
"""
from __future__ import annotations

from pathlib import Path

from .common import add_overwrite_flag, fraction, positive_float, print_sample, weight
from .train import add_training_flags, model_overrides, train_config


def _distill(args):
    from ..checkpoint import CheckpointError
    from ..checkpoint.outdir import claim_output
    from ..data import find_corpus, load_text, prepare_dataset
    from ..models import GPTConfig
    from ..training.distill import Distillation, distill, load_teacher

    out = Path(args.out_dir)
    # Refusals first: the output, the teacher's kind and vocabulary, the settings; then the data and the steps.
    claim_output(out / "ckpt", kind=Distillation.kind, resume=args.resume, overwrite=args.overwrite,
                 inputs=[args.teacher], companions=[out / "log.jsonl"])
    teacher, tokenizer = load_teacher(args.teacher, backend=args.backend)
    if tokenizer is None:
        raise CheckpointError(f"the teacher {args.teacher} has no tokenizer: the student could not read the text "
                              f"as the teacher does")
    doc_sep = _teacher_train_config(args.teacher).get("doc_sep")
    cfg = train_config(args, doc_sep)
    overrides = model_overrides(args)
    model_config = GPTConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size, **overrides)

    text = load_text(find_corpus(path=args.data))
    tokenizer, train_ids, val_ids = prepare_dataset(text, tokenizer, val_fraction=args.val_fraction, doc_sep=doc_sep)
    print(f"teacher: {args.teacher} ({teacher.num_parameters():,} parameters); student: {args.preset} "
          f"({tokenizer.vocab_size}-token vocabulary); temperature {args.temperature}, alpha {args.alpha}")
    objective = Distillation(teacher, temperature=args.temperature, alpha=args.alpha, teacher_path=args.teacher)
    model, _ = distill(model_config, cfg, objective, train_ids, val_ids, tokenizer=tokenizer, resume=args.resume,
                       overwrite=args.overwrite)
    print(f"checkpoint: {cfg.out_dir}/ckpt   log: {cfg.out_dir}/log.jsonl   plot: {cfg.out_dir}/loss.png")
    if args.sample_tokens:
        prompt = "" if getattr(tokenizer, "bos_id", None) is not None else "\n" if "\n" in text else text[0]
        print_sample(model, tokenizer, prompt, args.sample_tokens, temperature=0.8, top_k=None, top_p=None,
                     seed=cfg.seed)


def _teacher_train_config(path):
    from ..checkpoint import read_meta

    return (read_meta(path)[1].get("config") or {}).get("train") or {}


def add_parsers(sub):
    t = sub.add_parser("distill", help="train a small GPT on a larger one's softened predictions (knowledge distillation)")
    t.add_argument("--teacher", required=True, help="the teacher's checkpoint (a GPT trained on the same tokens)")
    t.add_argument("--preset", default="shakespeare-s1", help="the student's model preset (default shakespeare-s1)")
    t.add_argument("--temperature", type=positive_float, default=2.0,
                   help="softmax temperature of both distributions in the KL term (default 2)")
    t.add_argument("--alpha", type=weight, default=0.5,
                   help="weight of the distillation term, in [0, 1]; 1 - alpha weighs the labels' cross-entropy "
                        "(default 0.5)")
    t.add_argument("--data", help="text file (default: $NPFLUX_DATA_DIR/tinyshakespeare.txt)")
    t.add_argument("--out-dir", dest="out_dir", default="out-distill", help="where the student's ckpt/, log.jsonl and loss.png go (default out-distill)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt exactly where it stopped")
    add_overwrite_flag(t, "OUT_DIR/ckpt and log.jsonl")
    t.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="share of the text held out for validation (default 0.1: the last tenth, as npflux train)")
    add_training_flags(t)
    t.add_argument("--sample-tokens", type=int, default=0, help="print a sample of this many tokens at the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_distill)
