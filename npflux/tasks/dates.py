"""Dates written as people write them -> ISO 8601, a sequence-to-sequence task npflux generates itself.

    "3rd of March 1998", "Mar 3, 98", "03/03/1998", "TUESDAY, MARCH 3, 1998", ...  ->  "1998-03-03"

Dates run from 1900-01-01 to 2099-12-31. Two conventions keep every source
unambiguous: slashes are American (month/day/year) and dots European
(day.month.year); a two-digit year yy means 19yy for yy >= 50 and 20yy
otherwise, so formats with one are only drawn for 1950..2049.

The held-out set is disjoint from training by DATE, not only by string: a
fixed-seed 10% of all calendar days never appears in training, in any
format, so held-out accuracy measures reading dates, not remembering them.

Tokens are characters. The vocabulary (a ``CharTokenizer``) starts with three
control characters that never occur in a date: padding (id 0), BOS (1) and
EOS (2), the ids ``Seq2SeqConfig`` expects by default.
"""
from __future__ import annotations

import datetime as dt
import string

import numpy as np

from ..tokenizers.char import CharTokenizer

FIRST, LAST = dt.date(1900, 1, 1), dt.date(2099, 12, 31)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PAD, BOS, EOS = "\0", "\x02", "\x03"
ALPHABET = PAD + BOS + EOS + " ,-./" + string.digits + string.ascii_uppercase + string.ascii_lowercase
TARGET_LENGTH = 10  # YYYY-MM-DD


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 3 -> "3rd", 11 -> "11th", 22 -> "22nd"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _fields(d: dt.date) -> dict:
    month, weekday = MONTHS[d.month - 1], WEEKDAYS[d.weekday()]
    return dict(Y=f"{d.year}", y=f"{d.year % 100:02d}", m=f"{d.month:02d}", mn=f"{d.month}", d=f"{d.day:02d}",
                dn=f"{d.day}", do=ordinal(d.day), M=month, Mb=month[:3], W=weekday, Wa=weekday[:3])


# name -> (template over _fields, uses a two-digit year)
FORMATS = {
    "month_day_year": ("{M} {dn}, {Y}", False),             # March 3, 1998
    "month_ordinal_year": ("{M} {do}, {Y}", False),          # March 3rd, 1998
    "abbr_day_short_year": ("{Mb} {dn}, {y}", True),         # Mar 3, 98
    "weekday_month_day_year": ("{W}, {M} {dn}, {Y}", False),  # Tuesday, March 3, 1998
    "weekday_abbr_day_month": ("{Wa}, {dn} {Mb} {Y}", False),  # Tue, 3 Mar 1998
    "day_month_year": ("{dn} {M} {Y}", False),               # 3 March 1998
    "day_abbr_short_year": ("{dn} {Mb} {y}", True),          # 3 Mar 98
    "ordinal_of_month_year": ("{do} of {M} {Y}", False),     # 3rd of March 1998
    "the_ordinal_of_month": ("the {do} of {M}, {Y}", False),  # the 3rd of March, 1998
    "weekday_ordinal_month": ("{W} {do} {M} {Y}", False),    # Tuesday 3rd March 1998
    "day_abbr_year_dashes": ("{dn}-{Mb}-{Y}", False),        # 3-Mar-1998
    "year_abbr_day": ("{Y} {Mb} {dn}", False),               # 1998 Mar 3
    "us_numeric": ("{m}/{d}/{Y}", False),                    # 03/03/1998
    "us_short": ("{mn}/{dn}/{y}", True),                     # 3/3/98
    "eu_dots": ("{d}.{m}.{Y}", False),                       # 03.03.1998
    "eu_dots_short": ("{dn}.{mn}.{y}", True),                # 3.3.98
    "year_slashes": ("{Y}/{m}/{d}", False),                  # 1998/03/03
    "compact": ("{Y}{m}{d}", False),                         # 19980303
}
CASES = ("as is", "lower", "upper")


def format_date(d: dt.date, fmt: str, case: str = "as is") -> str:
    """``d`` written in format ``fmt`` (a key of FORMATS), in the given letter case."""
    if fmt not in FORMATS:
        raise KeyError(f"unknown date format {fmt!r}; formats: {', '.join(FORMATS)}")
    template, short_year = FORMATS[fmt]
    if short_year and not 1950 <= d.year <= 2049:
        raise ValueError(f"format {fmt!r} writes a two-digit year, which stands for 1950..2049 only, not {d.year}")
    text = template.format(**_fields(d))
    return {"as is": text, "lower": text.lower(), "upper": text.upper()}[case]


def _max_source_length() -> int:
    longest = dt.date(2000, 9, 27)  # a Wednesday in September: the longest names, a two-digit ordinal
    return max(len(format_date(longest, f)) for f in FORMATS)


class DateTask:
    """Random (source, target) pairs, a fixed held-out set, and their encoding as id arrays.

    ``seed`` fixes which calendar days are held out and which held-out
    examples are drawn; training batches come from the caller's generator.
    """

    def __init__(self, seed: int = 0, heldout_fraction: float = 0.1, heldout_size: int = 2000):
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.seed = seed
        self.tokenizer = CharTokenizer.from_chars(ALPHABET)
        self.pad_id, self.bos_id, self.eos_id = (self.tokenizer.stoi[c] for c in (PAD, BOS, EOS))
        days = np.arange(FIRST.toordinal(), LAST.toordinal() + 1)
        order = np.random.default_rng(seed).permutation(days)
        n_heldout = int(round(heldout_fraction * len(days)))
        self.days = {"heldout": np.sort(order[:n_heldout]), "train": np.sort(order[n_heldout:])}
        self.src_block_size = _max_source_length()
        self.tgt_block_size = TARGET_LENGTH + 1  # BOS + date as decoder input, date + EOS as targets
        self._heldout = self.sample(np.random.default_rng([seed, 1]), heldout_size, split="heldout")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def heldout(self) -> list:
        """The fixed held-out (source, target) pairs: the same list for the same seed."""
        return list(self._heldout)

    def sample(self, rng, n: int, split: str = "train") -> list:
        """``n`` random (source, ISO target) pairs from the days of ``split`` ("train" or "heldout")."""
        if split not in self.days:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        days = self.days[split]
        names = list(FORMATS)
        pairs = []
        while len(pairs) < n:
            d = dt.date.fromordinal(int(days[rng.integers(len(days))]))
            fmt = names[rng.integers(len(names))]
            if FORMATS[fmt][1] and not 1950 <= d.year <= 2049:
                continue  # a two-digit year would be ambiguous: draw again
            pairs.append((format_date(d, fmt, CASES[rng.integers(len(CASES))]), d.isoformat()))
        return pairs

    # -- ids ----------------------------------------------------------------------------------
    def encode_sources(self, sources) -> np.ndarray:
        """(B, S) ids, right-padded with the pad id to the longest source."""
        ids = [self.tokenizer.encode_array(s) for s in sources]
        for s, a in zip(sources, ids):
            if len(a) == 0 or len(a) > self.src_block_size:
                raise ValueError(f"source {s!r} has {len(a)} characters; sources need 1..{self.src_block_size}")
        out = np.full((len(ids), max(len(a) for a in ids)), self.pad_id, dtype=np.int64)
        for i, a in enumerate(ids):
            out[i, : len(a)] = a
        return out

    def encode_batch(self, pairs):
        """(src (B, S), decoder input BOS+target (B, T), targets target+EOS (B, T), -100 at padding)."""
        src = self.encode_sources([s for s, _ in pairs])
        tgt_ids = [self.tokenizer.encode_array(t) for _, t in pairs]
        T = max(len(t) for t in tgt_ids) + 1
        if T > self.tgt_block_size:
            raise ValueError(f"target longer than {self.tgt_block_size - 1} characters")
        tgt_in = np.full((len(pairs), T), self.pad_id, dtype=np.int64)
        targets = np.full((len(pairs), T), -100, dtype=np.int64)
        for i, t in enumerate(tgt_ids):
            tgt_in[i, 0] = self.bos_id
            tgt_in[i, 1 : len(t) + 1] = t
            targets[i, : len(t)] = t
            targets[i, len(t)] = self.eos_id
        return src, tgt_in, targets

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)
