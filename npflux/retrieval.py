"""A document store: passages, their embeddings, and top-k search by cosine similarity.

    text file -> split_passages -> passages -> embed (TF-IDF or a GPT's hidden states)
              -> unit-length vectors -> query vector -> cosine scores -> top k

Two ways to embed a passage:

- ``tfidf``: words (lower-cased ``\\w+`` runs) weighted by term frequency
  times inverse document frequency, ``idf(w) = ln((1 + N) / (1 + df(w))) + 1``
  (scikit-learn's smoothed form), each row scaled to unit length. Stored
  sparse (CSR), because a vocabulary of ten thousand words times thousands
  of passages would be mostly zeros.
- ``model``: the mean over a passage's tokens of a GPT's final hidden states
  (after ``ln_f``, before the head). Passages longer than the model's block
  are cut into block-sized windows, each run on its own. By default the mean
  vector of all passages is subtracted before normalising ("centering"): a
  language model's hidden states share a large common direction that makes
  every cosine similarity close to 1 and the ranking noisy. (A single
  passage is not centered: minus its own mean it would be zero.)

An index is saved as a directory (``index.json`` + ``arrays.safetensors``)
that records the SHA-256 of the documents it was built from and, for model
embeddings, a fingerprint of the model's weights, so a stale index or the
wrong model is an error with a message instead of silently wrong results.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .checkpoint.atomic import atomic_directory
from .training.loop import progress as progress_bar

INDEX_FORMAT = "npflux-index"
INDEX_VERSION = 1
INDEX_JSON = "index.json"
INDEX_ARRAYS = "arrays.safetensors"
METHODS = ("tfidf", "model")


class InvalidIndexError(ValueError):
    """An index cannot be used: damaged, stale, or built with a different model."""


class StaleIndexError(InvalidIndexError):
    """The documents changed since the index was built."""


# ---------------------------------------------------------------------------
# Passages
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    text: str
    line: int  # 1-based line of the source where the passage starts


_NEWLINE = re.compile(r"\r\n|\r|\n")


def split_passages(text: str, split: str = "auto", max_chars: int = 1000) -> list:
    """Passages of ``text``: one per non-empty line (``line``), per blank-line-separated
    paragraph (``paragraph``), or ``auto`` (paragraphs when the text has blank lines
    between non-empty ones, else lines). Passages longer than ``max_chars`` are cut at
    whitespace into pieces of at most ``max_chars`` characters.
    """
    if split not in ("auto", "line", "paragraph"):
        raise ValueError(f"split must be 'auto', 'line' or 'paragraph', got {split!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    # lines as an editor numbers them: str.splitlines would also break at \f, \v, \x1c-\x1e, \x85 and
    # \u2028/\u2029, shifting every later passage's line number
    lines = _NEWLINE.split(text)
    if split == "auto":
        stripped = [ln.strip() for ln in lines]
        first = next((i for i, s in enumerate(stripped) if s), len(lines))
        last = max((i for i, s in enumerate(stripped) if s), default=-1)
        split = "paragraph" if any(not s for s in stripped[first:last + 1]) else "line"
    blocks = []  # (first line number, text)
    if split == "line":
        blocks = [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
    else:
        start, current = None, []
        for i, ln in enumerate(lines + [""]):
            if ln.strip():
                start = i + 1 if start is None else start
                current.append(ln.rstrip())
            elif current:
                blocks.append((start, "\n".join(current).strip()))
                start, current = None, []
    passages = []
    for line, block in blocks:
        passages.extend(Passage(piece, line) for piece in _cut(block, max_chars))
    return passages


def _cut(text: str, max_chars: int):
    """Pieces of at most max_chars characters, cut at the last whitespace that fits."""
    while len(text) > max_chars:
        at = max(text.rfind(" ", 0, max_chars + 1), text.rfind("\n", 0, max_chars + 1))
        at = at if at > 0 else max_chars  # a single word longer than max_chars: cut it
        yield text[:at].strip()
        text = text[at:].strip()
    if text:
        yield text


# ---------------------------------------------------------------------------
# TF-IDF
# ---------------------------------------------------------------------------

_WORD = re.compile(r"\w+")

# English function words (NLTK's list, less the negations): in a question such as
# "What does dropout prevent?" they would otherwise match any passage with "what" or "does".
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself of off on once only or other our ours ourselves out over own same she should so some such
than that the their theirs them themselves then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your yours
yourself yourselves
""".split())


def words(text: str, stop_words=()) -> list:
    """Lower-cased word tokens (runs of letters, digits and underscores), less ``stop_words``."""
    return [w for w in _WORD.findall(text.casefold()) if w not in stop_words]


class TfidfEncoder:
    """TF-IDF vectors over a vocabulary fitted on the passages (raw counts times smoothed idf).

    ``stop_words``: words left out of every vector (``STOP_WORDS`` by default; ``()`` keeps all).
    """

    def __init__(self, vocab: list, idf, stop_words=STOP_WORDS):
        self.stop_words = frozenset(stop_words)
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.idf = np.asarray(idf, dtype=np.float32)
        if self.idf.shape != (len(self.vocab),):
            raise ValueError(f"idf has shape {self.idf.shape}, vocabulary has {len(self.vocab)} words")

    @classmethod
    def fit(cls, texts, stop_words=STOP_WORDS) -> "TfidfEncoder":
        docs = [set(words(t, stop_words)) for t in texts]
        vocab = sorted(set().union(*docs)) if docs else []
        df = np.zeros(len(vocab))
        col = {w: i for i, w in enumerate(vocab)}
        for d in docs:
            df[[col[w] for w in d]] += 1
        idf = np.log((1 + len(docs)) / (1 + df)) + 1.0
        return cls(vocab, idf, stop_words)

    def _row(self, text):
        counts = {}
        for w in words(text, self.stop_words):
            j = self.index.get(w)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        cols = np.array(sorted(counts), dtype=np.int64)
        vals = np.array([counts[j] for j in cols.tolist()], dtype=np.float32) * self.idf[cols]
        norm = float(np.linalg.norm(vals))
        return cols, (vals / norm if norm > 0 else vals)

    def transform(self, texts):
        """Unit-length TF-IDF rows as CSR arrays (indptr, indices, values)."""
        rows = [self._row(t) for t in texts]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(c) for c, _ in rows])
        indices = np.concatenate([c for c, _ in rows]) if rows else np.zeros(0, np.int64)
        values = np.concatenate([v for _, v in rows]) if rows else np.zeros(0, np.float32)
        return indptr, indices.astype(np.int64), values.astype(np.float32)

    def query(self, text):
        """A dense unit-length query vector (zero when no word of the query is known)."""
        cols, vals = self._row(text)
        q = np.zeros(len(self.vocab), dtype=np.float32)
        q[cols] = vals
        return q


def csr_dot(indptr, indices, values, q):
    """Row i of the CSR matrix dotted with the dense vector q, for every row."""
    products = values * q[indices]
    sums = np.concatenate([[0.0], np.cumsum(products, dtype=np.float64)])
    return (sums[indptr[1:]] - sums[indptr[:-1]]).astype(np.float32)


# ---------------------------------------------------------------------------
# Model embeddings
# ---------------------------------------------------------------------------


def final_hidden_states(model, idx):
    """(B, T) token ids -> (B, T, C): the GPT forward up to and including ``ln_f`` (no head).

    The caller puts the model in eval mode (no dropout); the modules keep
    their forward caches as in any forward, so concurrent callers share a lock.
    """
    t = model.transformer
    x = t.drop.forward(t.wpe.forward(t.wte.forward(model.backend.asarray(idx))))
    for block in t.h.items:
        x = block.forward(x)
    return t.ln_f.forward(x)


def encode_lenient(tokenizer, text: str):
    """(ids, dropped characters). A character tokenizer raises on characters it does
    not know; here they are left out (and reported) instead, which suits queries and
    documents (a '?' missing from the vocabulary should not stop a search).
    """
    stoi = getattr(tokenizer, "stoi", None)
    if stoi is None:
        return tokenizer.encode(text), []
    dropped = sorted({c for c in text if c not in stoi})
    if dropped:
        text = "".join(c for c in text if c in stoi)
    return (tokenizer.encode(text) if text else []), dropped


def model_fingerprint(model) -> str:
    """SHA-256 of the model's parameter names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, value in sorted(model.params.items()):
        a = np.ascontiguousarray(to_numpy(value))
        h.update(f"{name}:{a.shape}:{a.dtype};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ModelEncoder:
    """Mean-pooled final hidden states of a GPT.

    ``lock``: a context manager held around every forward (the server shares
    one model between requests). ``batch_size``: windows run per forward.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, lock=None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.dropped = set()  # characters the tokenizer did not know, over every text embedded

    def embed(self, texts, progress: bool = False):
        """(N, C) float32 mean-pooled hidden states (a text with no known token gets zeros)."""
        block = self.model.config.block_size
        windows, owner = [], []  # token windows of at most `block` ids, and the text each belongs to
        for i, text in enumerate(texts):
            ids, dropped = encode_lenient(self.tokenizer, text)
            self.dropped.update(dropped)
            for s in range(0, len(ids), block):
                windows.append(ids[s:s + block])
                owner.append(i)
        C = self.model.config.n_embd
        sums = np.zeros((len(texts), C), dtype=np.float64)
        counts = np.zeros(len(texts), dtype=np.int64)
        # Longest windows first so each batch pads little. Padding goes on the right: in a
        # causal model a real position never attends to a later (padded) one, so the pads
        # change nothing but their own rows, which the mask leaves out of the mean.
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j]))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        bar = progress_bar(len(windows), enabled=progress and bool(batches), unit="window", desc="embedding")
        for batch in batches:
            T = len(windows[batch[0]])
            ids = np.zeros((len(batch), T), dtype=np.int64)
            mask = np.zeros((len(batch), T), dtype=bool)
            for r, j in enumerate(batch):
                ids[r, :len(windows[j])] = windows[j]
                mask[r, :len(windows[j])] = True
            hidden = self._hidden(ids)
            for r, j in enumerate(batch):
                sums[owner[j]] += hidden[r][mask[r]].sum(axis=0, dtype=np.float64)
                counts[owner[j]] += int(mask[r].sum())
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)

    def _hidden(self, ids):
        with self.lock:
            with self.model.evaluating():
                return to_numpy(final_hidden_states(self.model, ids))


def _unit_rows(x):
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32)


# ---------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------


@dataclass
class SearchResult:
    rank: int
    score: float
    passage_id: int
    text: str
    line: int

    def to_dict(self):
        return asdict(self)


class DocumentIndex:
    """Passages and their unit-length embeddings, searchable by cosine similarity.

    Build with ``DocumentIndex.build(passages, "tfidf")`` or
    ``DocumentIndex.build(passages, "model", model=..., tokenizer=...)``;
    ``search(query, k)``; ``save(dir)`` / ``DocumentIndex.load(dir)``.
    """

    def __init__(self, passages, method, arrays, encoder_info, source=None, encoder=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.passages = list(passages)
        self.method = method
        self.arrays = arrays            # tfidf: indptr/indices/values (+ idf); model: embeddings (+ mean)
        self.encoder_info = encoder_info
        self.source = source or {}      # {"path", "sha256", "split", "max_chars"}
        self.encoder = encoder          # TfidfEncoder or ModelEncoder (None until bound)
        self._check_shapes()

    def __len__(self):
        return len(self.passages)

    def __repr__(self):
        return f"DocumentIndex({len(self)} passages, method={self.method!r}, source={self.source.get('path')!r})"

    # -- building -----------------------------------------------------------------
    @classmethod
    def build(cls, passages, method="tfidf", model=None, tokenizer=None, center=True, stop_words=STOP_WORDS,
              source=None, progress=False, lock=None, batch_size=32):
        passages = list(passages)
        if not passages:
            raise ValueError("no passages to index (is the document file empty?)")
        texts = [p.text for p in passages]
        if method == "tfidf":
            enc = TfidfEncoder.fit(texts, stop_words)
            indptr, indices, values = enc.transform(texts)
            arrays = {"indptr": indptr, "indices": indices, "values": values, "idf": enc.idf}
            info = {"vocab": enc.vocab, "stop_words": sorted(enc.stop_words)}
        elif method == "model":
            if model is None or tokenizer is None:
                raise ValueError("model embeddings need a model and its tokenizer (a checkpoint)")
            enc = ModelEncoder(model, tokenizer, batch_size=batch_size, lock=lock)
            emb = enc.embed(texts, progress=progress)
            center = center and len(emb) > 1  # one passage minus its own mean is zero: nothing left to compare
            mean = emb.mean(axis=0) if center else np.zeros(emb.shape[1], np.float32)
            arrays = {"embeddings": _unit_rows(emb - mean), "mean": mean.astype(np.float32)}
            info = {"fingerprint": model_fingerprint(model), "center": bool(center),
                    "config": model.config.to_dict(), "dropped_characters": sorted(enc.dropped)}
        else:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        return cls(passages, method, arrays, info, source=source, encoder=enc)

    @classmethod
    def from_file(cls, path, method="tfidf", split="auto", max_chars=1000, **kw):
        """Split a text file into passages and index them; the file's SHA-256 is recorded."""
        path = Path(path)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text ({exc})") from None
        passages = split_passages(text, split=split, max_chars=max_chars)
        source = {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "split": split,
                  "max_chars": max_chars}
        return cls.build(passages, method, source=source, **kw)

    def _check_shapes(self):
        n = len(self.passages)
        if self.method == "tfidf":
            indptr = self.arrays["indptr"]
            nnz = len(self.arrays["indices"])
            if indptr.shape != (n + 1,) or indptr[-1] != nnz or len(self.arrays["values"]) != nnz:
                raise InvalidIndexError(f"TF-IDF arrays do not match {n} passages")
            if len(self.arrays["idf"]) != len(self.encoder_info["vocab"]):
                raise InvalidIndexError("TF-IDF idf and vocabulary differ in length")
        else:
            if self.arrays["embeddings"].shape[0] != n:
                raise InvalidIndexError(f"{self.arrays['embeddings'].shape[0]} embeddings for {n} passages")

    # -- the query encoder ----------------------------------------------------------
    def bind_model(self, model, tokenizer, lock=None, batch_size=32):
        """Attach the model that embeds queries; it must be the one that built the index."""
        if self.method != "model":
            return self
        found = model_fingerprint(model)
        if found != self.encoder_info["fingerprint"]:
            raise InvalidIndexError(
                "this index was built with different model weights (fingerprint "
                f"{self.encoder_info['fingerprint'][:12]}..., this model {found[:12]}...): "
                "rebuild it with this checkpoint (npflux index --method model --checkpoint ...)")
        self.encoder = ModelEncoder(model, tokenizer, batch_size=batch_size, lock=lock)
        return self

    def embed_query(self, query: str):
        """The query's unit-length vector (TF-IDF: dense over the vocabulary) and the
        characters the model's tokenizer could not encode (always [] for TF-IDF)."""
        if self.method == "tfidf":
            if self.encoder is None:
                self.encoder = TfidfEncoder(self.encoder_info["vocab"], self.arrays["idf"],
                                            self.encoder_info.get("stop_words", ()))
            return self.encoder.query(query), []
        if self.encoder is None:
            raise InvalidIndexError("a model-embedded index needs its model to embed queries: call bind_model(model, tokenizer)")
        _, dropped = encode_lenient(self.encoder.tokenizer, query)
        emb = self.encoder.embed([query])[0]
        if not emb.any():  # nothing encodable: no direction to compare
            return np.zeros_like(emb), dropped
        return _unit_rows(emb - self.arrays["mean"]), dropped

    # -- search -------------------------------------------------------------------------
    def scores(self, query_vector):
        """Cosine similarity of the query with every passage, (N,) float32."""
        if self.method == "tfidf":
            a = self.arrays
            return csr_dot(a["indptr"], a["indices"], a["values"], query_vector)
        return self.arrays["embeddings"] @ query_vector

    def search(self, query: str, k: int = 5):
        """The k passages most similar to ``query``, best first.

        TF-IDF returns only passages that share a word with the query (fewer than k, or
        none, when there are not so many); a model-embedded index returns k unless no
        character of the query is in the model's vocabulary (then none).
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q, _ = self.embed_query(query)
        if not q.any():
            return []
        s = self.scores(q)
        if self.method == "tfidf":  # a TF-IDF score of 0 means no word in common: not a match
            k = min(k, int((s > 0).sum()))
            if k == 0:
                return []
        # by score, ties by passage order (a full sort: argpartition would pick among ties at the cut arbitrarily)
        top = np.lexsort((np.arange(len(s)), -s))[:k]
        return [SearchResult(r + 1, float(s[i]), int(i), self.passages[i].text, self.passages[i].line)
                for r, i in enumerate(top.tolist())]

    # -- disk -----------------------------------------------------------------------------
    def check_source(self, docs_path):
        """Raise StaleIndexError unless ``docs_path`` hashes as the file the index was built from."""
        expected = self.source.get("sha256")
        actual = _sha256(docs_path)
        if expected != actual:
            raise StaleIndexError(
                f"the index was built from {self.source.get('path')} (sha256 {str(expected)[:12]}...) but "
                f"{docs_path} has sha256 {actual[:12]}...: the documents changed; rebuild the index "
                f"(npflux index --docs {docs_path} ...)")

    def save(self, directory):
        """Write ``directory/index.json`` and ``directory/arrays.safetensors`` (replacing any old index)."""
        import safetensors.numpy

        directory = Path(directory)
        if directory.exists() and not (directory / INDEX_JSON).is_file():
            raise InvalidIndexError(f"{directory} exists and is not an npflux index; not overwriting it")
        # written beside its name and swapped in whole: a crash never leaves half an index (checkpoint.atomic)
        with atomic_directory(directory, marker=INDEX_JSON, files=(INDEX_JSON, INDEX_ARRAYS)) as tmp:
            arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
            safetensors.numpy.save_file(arrays, str(tmp / INDEX_ARRAYS))
            meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "method": self.method,
                    "source": self.source, "encoder": self.encoder_info,
                    "arrays_sha256": _sha256(tmp / INDEX_ARRAYS),
                    "passages": [asdict(p) for p in self.passages]}
            with open(tmp / INDEX_JSON, "w", encoding="utf-8") as f:
                json.dump(meta, f, ensure_ascii=False)
        return directory

    @classmethod
    def load(cls, directory, docs=None):
        """Read an index saved by ``save``; with ``docs``, check it was built from that file."""
        import safetensors.numpy

        directory = Path(directory)
        meta_path, arrays_path = directory / INDEX_JSON, directory / INDEX_ARRAYS
        if not meta_path.is_file() or not arrays_path.is_file():
            raise FileNotFoundError(f"no npflux index at {directory} (expected {INDEX_JSON} and {INDEX_ARRAYS})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InvalidIndexError(f"{meta_path} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            meta = meta if isinstance(meta, dict) else {}
            raise InvalidIndexError(f"{directory} is not an npflux index of version {INDEX_VERSION} "
                              f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        missing = [key for key in ("arrays_sha256", "method", "encoder", "source", "passages") if key not in meta]
        if missing:  # (a bare KeyError would reach the user as just the key's name)
            raise InvalidIndexError(f"{meta_path} lacks {', '.join(missing)} (damaged); rebuild the index")
        if _sha256(arrays_path) != meta["arrays_sha256"]:
            raise InvalidIndexError(f"{arrays_path} does not match the hash recorded in {meta_path} (damaged or replaced)")
        arrays = safetensors.numpy.load_file(str(arrays_path))
        passages = [Passage(p["text"], int(p["line"])) for p in meta["passages"]]
        index = cls(passages, meta["method"], arrays, meta["encoder"], source=meta["source"])
        if docs is not None:
            index.check_source(docs)
        return index


def _sha256(path) -> str:
    from .checkpoint import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------------------
# Retrieval-augmented prompts
# ---------------------------------------------------------------------------

RAG_TEMPLATE = "{context}\nQuestion: {question}\nAnswer:"


def build_rag_prompt(question: str, results, template: str = RAG_TEMPLATE, fits=None):
    """(prompt, n_used): ``template`` with ``{question}`` and, in ``{context}``, the first
    passages of ``results`` (best first, one per line): as many as ``fits(prompt)``
    allows (a small model's context holds only so much; by default all of them).
    The question is always there, even when no passage fits beside it.
    """
    if "{question}" not in template:
        raise ValueError("the prompt template needs a {question} placeholder")

    def fill(n):
        context = "\n".join(r.text for r in results[:n])
        return template.replace("{context}", context).replace("{question}", question).lstrip("\n")

    used = 0
    for n in range(1, len(results) + 1):
        if fits is not None and not fits(fill(n)):
            break
        used = n
    return fill(used), used


# ---------------------------------------------------------------------------
# Extractive answers: a reader over the retrieved passages
# ---------------------------------------------------------------------------


def answer_with_reader(index, reader, vocab, question: str, k: int = 3, threshold: float = 0.0) -> dict:
    """Retrieve the top ``k`` passages, let the reader point at the best span of each, answer with the best.

    A span's score is how far its start and end logits beat the passage's
    "no answer" ([CLS]) logits (``npflux.tasks.qa.best_spans``); the
    answer is the highest-scoring span over the k passages, or None ("no
    answer found") when no span scores above ``threshold``. Returns
    {"answer", "score", "source": the passage it came from (rank, line,
    text, retrieval score, span offsets) or None, "candidates": every
    passage's best span}.
    """
    from .tasks.qa import read

    results = index.search(question, k)
    spans = read(reader, vocab, question, [r.text for r in results]) if results else []
    candidates = [{"rank": r.rank, "line": r.line, "retrieval_score": r.score, "text": r.text, "span": s.text,
                   "start": s.start, "end": s.end, "score": s.score} for r, s in zip(results, spans)]
    best = max(candidates, key=lambda c: c["score"], default=None)
    if best is None or not best["score"] > threshold:
        return {"answer": None, "score": best["score"] if best else None, "source": None, "candidates": candidates}
    return {"answer": best["span"], "score": best["score"], "source": best, "candidates": candidates}
