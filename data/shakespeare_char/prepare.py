"""Prepare Tiny Shakespeare for character-level training (as nanoGPT's shakespeare_char).

    python data/shakespeare_char/prepare.py                   # use a local copy (see below)
    python data/shakespeare_char/prepare.py --download        # fetch it first if missing
    python data/shakespeare_char/prepare.py --input my.txt --out-dir data/my_char

Writes train.bin and val.bin (uint16 ids, first 90% / last 10%) and meta.json
(the tokenizer and the sizes) into --out-dir (this folder by default).
Without --input the corpus is found by npflux.data.find_corpus: the file
$NPFLUX_DATA_DIR/tinyshakespeare.txt, else data/shakespeare_char/input.txt;
either is checked against its published SHA-256.
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from npflux import data  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=None, help="corpus text file (default: find Tiny Shakespeare)")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write train.bin, val.bin, meta.json")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the text kept for validation")
    parser.add_argument("--download", action="store_true", help="download Tiny Shakespeare when no local copy exists")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the corpus")
    args = parser.parse_args(argv)

    verify = False if args.no_verify else None
    if args.input is not None:
        path = data.find_corpus(path=args.input, verify=verify)
    else:
        try:
            path = data.find_corpus(verify=verify)
        except FileNotFoundError:
            if not args.download:
                raise
            path = data.download_tinyshakespeare(data.REPO_SHAKESPEARE)
    text = data.load_text(path)
    tok, train_ids, val_ids = data.prepare_char_dataset(text, val_fraction=args.val_fraction)
    data.write_prepared_dataset(args.out_dir, tok, train_ids, val_ids, extra={"source": path.name})
    print(f"corpus: {path} ({len(text):,} characters)")
    print(f"vocab size: {tok.vocab_size}")
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    print(f"wrote {args.out_dir / 'train.bin'}, {args.out_dir / 'val.bin'}, {args.out_dir / 'meta.json'}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as exc:  # no corpus, no network, a bad checksum: one line, not a traceback
        sys.exit(f"prepare.py: error: {exc}")
