"""Extractive question answering: words with their offsets, SQuAD's metrics, and a generator of synthetic QA pairs.

Words. ``word_spans(text)`` (``npflux.tokenizers.words``) cuts text into words (``\\w+`` runs, with the
digits of "299,792" or "1.45" kept in one word) and single punctuation
marks, each with its character offsets, so a span of words is a span of the
original text.

Metrics (SQuAD v1.1's evaluation script, Rajpurkar et al. 2016). Both sides
are normalised: lower-cased, punctuation and the articles a/an/the removed,
whitespace collapsed. ``exact_match`` is 1 when the normalised strings are
equal; ``token_f1`` the harmonic mean of the precision and recall of their
bags of words.

The generator. ``SyntheticQA(seed)`` writes facts about invented things and
a question whose answer is a span of the fact:

    fact      "Velmor Quandal was drubished by Asha Tiren in 1852."
    question  "Who drubished Velmor Quandal?"            answer "Asha Tiren"

Every name, object, verb and measured noun is a pseudo-word drawn from
syllables (``pseudo_word``), so no two facts share their content words and
a reader cannot learn what is true, only where in a sentence the answer to a
question of a given form lies. What is fixed is the grammar: the templates
of ``RELATIONS`` (function words, wh-words, "approximately", "million",
number and date formats). A fact comes with one to three distractor facts
about other invented things around it (the reader must find the right
sentence), and a fifth of the examples ask about a thing the passage does
not mention: their answer is "no answer" (``answer is None``).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy
from ..tokenizers.words import collate, word_spans


# ---------------------------------------------------------------------------
# SQuAD's metrics
# ---------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD v1.1's normalize_answer)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the normalised words: 2 P R / (P + R), P and R over the words the two share (with repeats)."""
    pred, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not true:
        return float(pred == true)
    common = sum((Counter(pred) & Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(true)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gl", "h", "j", "k", "kr", "l", "m", "n", "p", "pl", "qu", "r", "s",
           "sh", "st", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "m", "s", "th", "x", "nd", "rk"]


def pseudo_word(rng, syllables=None) -> str:
    """A pronounceable invented word of 2-3 syllables ("velmor", "quandal")."""
    n = syllables or int(rng.integers(2, 4))
    return "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] +
                   _CODAS[rng.integers(len(_CODAS))] for _ in range(n))


@dataclass(frozen=True)
class QAExample:
    question: str
    passage: str
    answer: str | None            # None: the passage does not answer the question
    answer_start: int = -1        # character offsets of the answer in the passage
    answer_end: int = -1


class _Draw:
    """The pieces a template fills in, each drawn fresh."""

    def __init__(self, rng):
        self.rng = rng

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def name(self):  # a person: one to three capitalised pseudo-words, sometimes with a particle ("da", "van")
        r = self.rng.random()
        first, last = pseudo_word(self.rng).capitalize(), pseudo_word(self.rng).capitalize()
        if r < 0.15:
            return last
        if r < 0.3:
            return f"{first} {self.pick(['da', 'de', 'van', 'von', 'al', 'del'])} {last}"
        if r < 0.4:
            return f"{first} {pseudo_word(self.rng).capitalize()} {last}"
        return f"{first} {last}"

    def thing(self):  # a thing: "the kelmira", "the drosk engine", "Velmorine"
        r = self.rng.random()
        if r < 0.35:
            return pseudo_word(self.rng).capitalize()
        if r < 0.7:
            return f"the {pseudo_word(self.rng)}"
        return f"the {pseudo_word(self.rng)} {pseudo_word(self.rng)}"

    def noun(self):  # a plain (singular) noun
        return pseudo_word(self.rng)

    def verb(self):  # (base, third person, past): "drubish", "drubishes", "drubished"
        base = pseudo_word(self.rng)
        third = base + ("es" if base.endswith(("s", "sh", "x", "th")) else "s")
        return base, third, base + ("d" if base.endswith("e") else "ed")

    def word(self):  # a noun, now and then hyphenated ("glor-vantic")
        return f"{self.noun()}-{self.noun()}" if self.rng.random() < 0.1 else self.noun()

    def phrase(self, depth=0):  # a noun phrase of 1 to about 10 words: "glor", "the trindle of varks", ...
        r = self.rng.random()
        if r < 0.2:
            out = self.word()
        elif r < 0.4:
            out = f"{self.word()} {self.word()}"
        elif r < 0.55:
            out = f"{self.word()} {self.word()} {self.word()}"
        elif r < 0.75:
            out = f"{self.pick(['the ', 'a ', ''])}{self.word()} of {self.word()}s"
        elif r < 0.9:
            out = f"{self.word()} {self.pick(['from', 'with', 'to', 'in', 'for', 'through'])} {self.word()} {self.word()}"
        else:
            out = f"{self.verb()[0]}ing {self.word()} {self.pick(['to', 'into', 'from'])} {self.word()} {self.word()}s"
        if depth == 0 and self.rng.random() < 0.15:  # coordination: "X and Y", "X or Y"
            out = f"{out} {self.pick(['and', 'or'])} {self.phrase(depth=1)}"
        return out

    def tail(self):  # what may follow an answer in its sentence (not part of it): a prepositional phrase or adverb
        r = self.rng.random()
        if r < 0.55:
            return ""
        if r < 0.65:
            return " " + self.pick(["today", "again", "too", "often", "each year", "at first", "as well", "in time"])
        prep = self.pick(["in", "on", "at", "for", "from", "during", "throughout", "with", "without", "under", "over",
                          "after", "before", "across", "among", "since", "until", "within", "by", "near", "into"])
        det = self.pick(["the ", "some ", "their ", "its ", "each ", "a ", "all ", ""])
        return f" {prep} {det}{self.noun()}{self.pick(['', 's', ' ' + self.noun() + 's'])}"

    def number(self):
        r = self.rng.random()
        if r < 0.4:
            return str(int(self.rng.integers(2, 1000)))
        if r < 0.6:
            return f"{int(self.rng.integers(1, 999))},{int(self.rng.integers(0, 1000)):03d}"
        if r < 0.8:
            return f"{self.rng.integers(1, 100)}.{self.rng.integers(1, 100)} {self.pick(['million', 'billion', 'thousand'])}"
        return f"{self.pick(['two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten', 'twelve'])}"

    def year(self):
        return str(int(self.rng.integers(1000, 2030)))

    def date(self):
        months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
                  "October", "November", "December"]
        r = self.rng.random()
        if r < 0.6:
            return self.year()
        if r < 0.8:
            return f"{self.pick(months)} {self.year()}"
        return f"{self.pick(months)} {int(self.rng.integers(1, 29))}, {self.year()}"

    def approx(self, text):
        return f"{self.pick(['approximately', 'about', 'nearly', 'roughly'])} {text}" if self.rng.random() < 0.3 else text


def _cap(s):
    return s[:1].upper() + s[1:]


def _relations():
    """Each relation: a function of a _Draw returning (subject, fact with {A} where the answer goes, answer,
    question). The sentence forms cover the wh-questions of factoid QA; every content word is invented."""

    def agent(d):  # who did it
        x, who = d.thing(), d.name()
        base, third, past = d.verb()
        fact = d.pick([f"{_cap(x)} was {past} by {{A}}.", f"{{A}} {past} {x}.",
                       f"{_cap(x)} was {past} by {{A}} in {d.year()}.", f"In {d.year()}, {{A}} {past} {x}."])
        q = d.pick([f"Who {past} {x}?", f"Who {past} {x} first?", f"By whom was {x} {past}?"])
        return x, fact, who, q

    def definition(d):  # what is X
        x = d.thing()
        what = f"{d.pick(['a', 'an', 'the'])} {d.noun()} {d.pick(['of', 'for', 'with', 'that has'])} {d.phrase()}"
        fact = d.pick([f"{_cap(x)} is {{A}}.", f"{_cap(x)} was {{A}}."])
        return x, fact, what, d.pick([f"What is {x}?", f"What was {x}?"])

    def object_(d):  # what does X verb
        x, y = d.thing(), d.phrase()
        base, third, past = d.verb()
        fact = d.pick([f"{_cap(x)} {third} {{A}}.", f"{_cap(x)} {past} {{A}}.", f"{_cap(x)} often {third} {{A}}."])
        q = f"What does {x} {base}?" if f" {third} " in fact else f"What did {x} {base}?"
        return x, fact, y, q

    def count(d):  # how many
        x, unit = d.thing(), d.noun() + "s"
        n = d.approx(d.number())
        fact = d.pick([f"{_cap(x)} has {{A}} {unit}.", f"{_cap(x)} contains {{A}} {unit}.",
                       f"There are {{A}} {unit} in {x}.", f"The {unit[:-1]} count of {x} is {{A}}."])
        q = d.pick([f"How many {unit} does {x} have?", f"How many {unit} are in {x}?",
                    f"How many {unit} are there in {x}?"])
        return x, fact, n, q

    def when(d):  # when
        x = d.thing()
        base, third, past = d.verb()
        date = d.date()
        fact = d.pick([f"{_cap(x)} was {past} in {{A}}.", f"In {{A}}, {x} was {past}.", f"{_cap(x)} was {past} on {{A}}."])
        q = d.pick([f"When was {x} {past}?", f"In what year was {x} {past}?"])
        return x, fact, date, q

    def superlative(d):  # which is the most ...
        y, kind = d.thing(), d.noun()
        adj = d.pick(["largest", "smallest", "longest", "oldest", "highest", "deepest", "fastest", "brightest",
                      "heaviest", "youngest"])
        where = d.pick(["", f" in {d.thing()}", f" on {d.thing()}", f" of all {kind}s"])
        fact = d.pick([f"{{A}} is the {adj} {kind}{where}.", f"The {adj} {kind}{where} is {{A}}."])
        q = d.pick([f"What is the {adj} {kind}{where}?", f"Which {kind} is the {adj}{where}?"])
        return y, fact, y, q

    def role(d):  # the R of X
        x, y, r = d.thing(), d.thing(), d.noun()
        fact = d.pick([f"{{A}} is the {r} of {x}.", f"The {r} of {x} is {{A}}."])
        return x, fact, y, d.pick([f"What is the {r} of {x}?", f"Which is the {r} of {x}?"])

    def purpose(d):  # why
        x = d.thing()
        base, third, past = d.verb()
        why = d.pick([f"as {d.phrase()} for {d.noun()}s", f"to {d.verb()[0]} {d.phrase()}",
                      f"because of {d.phrase()}"])
        fact = f"{_cap(x)} {d.pick(['was', 'were'])} {past} {{A}}."
        return x, fact, why, d.pick([f"Why was {x} {past}?", f"Why were {x} {past}?"])

    def manner(d):  # how
        x, y = d.thing(), d.phrase()
        base, third, past = d.verb()
        how = d.pick([f"by {d.verb()[0]}ing {d.phrase()}", f"through {d.phrase()}", f"with {d.phrase()}"])
        fact = f"{_cap(x)} {third} {y} {{A}}."
        return x, fact, how, f"How does {x} {base} {y}?"

    def measure(d):  # at what / how fast: a number with its unit
        x, unit = d.thing(), d.noun() + "s"
        base, third, past = d.verb()
        value = d.approx(f"{d.number()} {unit}" + d.pick(["", f" per {d.noun()}"]))
        quantity = d.noun()
        fact = d.pick([f"{_cap(x)} {third} at {{A}}.", f"The {quantity} of {x} is {{A}}."])
        q = (f"At what {quantity} does {x} {base}?" if " at {A}" in fact else
             d.pick([f"What is the {quantity} of {x}?", f"How {d.pick(['fast', 'far', 'hot', 'long'])} is the {quantity} of {x}?"]))
        return x, fact, value, q

    def acronym(d):  # stands for
        letters = "".join(d.pick(string.ascii_uppercase) for _ in range(int(d.rng.integers(2, 5))))
        full = " ".join(d.noun() for _ in range(len(letters) if d.rng.random() < 0.5 else 2))
        fact = d.pick([f"{letters} stands for {{A}}.", f"{letters} is short for {{A}}."])
        return letters, fact, full, d.pick([f"What does {letters} stand for?", f"What is {letters} short for?"])

    def used(d):  # which X is used for
        x, kind = d.thing(), d.noun()
        y = d.thing()
        base, third, past = d.verb()
        fact = d.pick([f"{{A}} is used as the {kind} for {x}.", f"{{A}} is the {kind} used to {base} {x}."])
        q = d.pick([f"Which {kind} is used for {x}?", f"What {kind} is used to {base} {x}?"])
        return x, fact, y, q

    def helps(d):  # what helps (the subject)
        y, obj = d.thing(), d.phrase()
        base, third, past = d.verb()
        fact = d.pick([f"{{A}} helps {base} {obj}.", f"{{A}} {third} {obj}."])
        q = d.pick([f"What helps {base} {obj}?", f"What {third} {obj}?"])
        return y, fact, y, q

    def kind_of(d):  # what kind of / which: the answer holds the kind's own noun ("dense retrieval")
        x, kind = d.thing(), d.noun()
        base, third, past = d.verb()
        y = f"{d.pick([d.noun(), d.noun() + '-' + d.noun(), d.noun().capitalize()])} {kind}"
        other = d.verb()
        if d.rng.random() < 0.5:
            what = d.phrase()
            fact = f"{_cap(x)} {third} {{A}} for {what}."
            q = d.pick([f"What kind of {kind} does {x} {base} for {what}?", f"Which {kind} does {x} {base}?"])
        else:
            fact = f"{{A}} is {past} to {other[0]} {x}."
            q = d.pick([f"Which {kind} is {past} to {other[0]} {x}?", f"What kind of {kind} is {past} to {other[0]} {x}?"])
        return x, fact, y, q

    return [agent, definition, object_, count, when, superlative, role, purpose, manner, measure, acronym, used, helps,
            kind_of]


RELATIONS = _relations()


class SyntheticQA:
    """An endless stream of ``QAExample``s (see the module docstring); the same seed gives the same stream."""

    def __init__(self, seed: int = 0, no_answer: float = 0.2, distractors=(0, 3)):
        self.rng = np.random.default_rng(seed)
        self.no_answer = no_answer
        self.distractors = distractors

    def fact(self, subject=None, avoid=None):
        """(sentence, answer, question, answer's character offsets in the sentence, subject, relation).

        ``subject``: write the fact about this thing instead of a fresh one
        (a distractor about the question's own subject, by another relation
        than ``avoid``), where the relation's subject is not its answer.
        """
        d = _Draw(self.rng)
        while True:
            relation = d.pick(RELATIONS)
            own, fact, answer, question = relation(d)
            if "{A}" not in fact or relation is avoid:
                continue
            if subject is not None:
                if own == answer or own not in fact:
                    continue
                if fact.startswith(_cap(own)):  # the subject opens the sentence: capitalised there only
                    fact = _cap(subject) + fact[len(own):]
                fact, question = fact.replace(own, subject), None
                own = subject
            break
        words = answer.split()
        if question is not None and len(words) >= 2 and self.rng.random() < 0.25:
            # an answer may repeat a word of its question ("What does gradient clipping prevent?" /
            # "exploding gradients"): one of its words becomes one of the subject's
            own_words = [w for w in own.split() if w.lower() not in ("the", "a", "an")]
            if own_words and own != answer:
                i = int(self.rng.integers(len(words)))
                words[i] = own_words[int(self.rng.integers(len(own_words)))].lower() + d.pick(["", "s"])
                answer = " ".join(words)
        if fact.endswith("{A}."):  # something may follow the answer in its sentence
            fact = fact[:-1] + d.tail() + "."
        at = fact.index("{A}")
        sentence = _cap(fact.replace("{A}", answer, 1))
        return sentence, answer, question, (at, at + len(answer)), own, relation

    def example(self) -> QAExample:
        sentence, answer, question, (a, b), subject, relation = self.fact()
        n = int(self.rng.integers(self.distractors[0], self.distractors[1] + 1))
        others = [self.fact()[0] for _ in range(n)]
        if subject != answer and self.rng.random() < 0.5:  # another fact about the same subject: a near miss
            others = others[1:] + [self.fact(subject=subject, avoid=relation)[0]]
            self.rng.shuffle(others)
        if self.rng.random() < self.no_answer:  # the question's fact is not in the passage
            others = others or [self.fact()[0]]
            return QAExample(question, " ".join(others), None)
        pos = int(self.rng.integers(len(others) + 1))
        before = " ".join(others[:pos])
        offset = len(before) + (1 if before else 0)
        passage = " ".join(others[:pos] + [sentence] + others[pos:])
        start, end = offset + a, offset + b  # (an answer that opens its sentence is capitalised there)
        return QAExample(question, passage, passage[start:end], start, end)

    def take(self, n: int) -> list:
        return [self.example() for _ in range(n)]


# ---------------------------------------------------------------------------
# reading: a reader's best span of each passage
# ---------------------------------------------------------------------------


def best_spans(start, end, allowed, max_words: int):
    """Per row: (i, j, score) of the best span i <= j < i + max_words over the allowed positions but [CLS],
    with score = start[i] + end[j] - (start[0] + end[0]): how far the span beats "no answer".

    Host arrays in, host values out (a row with no passage word gets (0, 0, -inf)).
    """
    start, end, allowed = to_numpy(start).astype(np.float64), to_numpy(end).astype(np.float64), to_numpy(allowed)
    B, T = start.shape
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    band = (j >= i) & (j < i + max_words)
    out = []
    for b in range(B):
        ok = allowed[b].copy()
        ok[0] = False
        valid = band & ok[:, None] & ok[None, :]
        if not valid.any():
            out.append((0, 0, -np.inf))
            continue
        scores = np.where(valid, start[b][:, None] + end[b][None, :], -np.inf)
        k = int(np.argmax(scores))
        out.append((k // T, k % T, float(scores.flat[k] - (start[b, 0] + end[b, 0]))))
    return out


@dataclass
class Span:
    """An answer read from a passage: its text, characters [start, end) in the passage, and its score."""
    text: str
    start: int
    end: int
    score: float


def read_pairs(reader, vocab, pairs, batch_size: int = 64) -> list:
    """The best span (a ``Span``) of each (question, passage) pair, over the passage's windows when long; eval mode.

    ``reader`` is an ``npflux.models.Reader``, ``vocab`` its ``npflux.tokenizers.words.ReaderVocab``.
    """
    windows, owner = [], []
    for n, (question, passage) in enumerate(pairs):
        for w in vocab.encode(question, passage, reader.config.block_size):
            windows.append(w)
            owner.append(n)
    best = [Span("", 0, 0, -np.inf) for _ in pairs]
    with reader.evaluating():
        for lo in range(0, len(windows), batch_size):
            chunk, owners = windows[lo: lo + batch_size], owner[lo: lo + batch_size]
            batch = collate(chunk)
            (start, end), _ = reader.forward(batch)
            spans = best_spans(start, end, batch["allowed"], reader.config.max_answer_words)
            for w, n, (i, j, score) in zip(chunk, owners, spans):
                if score > best[n].score:
                    a, b = w["offsets"][i][0], w["offsets"][j][1]
                    best[n] = Span(pairs[n][1][a:b], a, b, score)
    reader.loss_cache = None
    return best


def read(reader, vocab, question: str, passages, batch_size: int = 64) -> list:
    """The best span of each passage for ``question``: ``read_pairs`` with one question."""
    return read_pairs(reader, vocab, [(question, p) for p in passages], batch_size)
