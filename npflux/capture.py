"""Activation capture: record chosen intermediate arrays of a forward pass by name.

    from npflux.capture import capture

    with capture(model, ["transformer.h.*", "transformer.h.0.attn.weights"]) as acts:
        model.forward(idx)
    resid = acts["transformer.h.3"]          # (B, T, C): the residual stream after block 3
    attn = acts["transformer.h.0.attn.weights"]   # (B, H, T, T)

Capture points are named after the module tree, so they read like the
parameter names (``transformer.h.3.attn.c_attn.weight`` is a parameter of
the module whose output is the point ``transformer.h.3.attn.c_attn``):

- every submodule with a ``forward``: the point ``<module>`` is its output.
  For a GPT, ``transformer.h.{i}`` is the residual stream after block i,
  ``transformer.drop`` the one entering block 0 (token + position
  embeddings), ``transformer.h.{i}.attn`` / ``.mlp`` what each branch adds,
  ``transformer.ln_f`` the normalised final stream.
- ``<block>.resid_mid``: the residual stream between a block's attention
  and its MLP (the input of its ``ln_2``).
- ``<attention>.weights``: the attention probabilities (B, H, T, S) (the
  module keeps them after every forward).
- ``<feed-forward>.hidden``: the MLP's hidden activations after the
  non-linearity (B, T, 4C) (the input of its ``c_proj``).

Patterns are matched segment by segment with ``fnmatch`` (``*`` stays within
one dotted segment), so ``transformer.h.*`` is the block outputs and not
everything inside the blocks; ``transformer.h.*.attn.weights`` is every
layer's attention. A pattern that matches nothing raises a KeyError listing
the valid names.

How: for the duration of the ``with`` block, the ``forward`` of each module
involved is shadowed by an instance attribute that calls the class's forward
and records a copy of its input or output; leaving the block deletes the
attributes. Outside a capture the model runs its own code, unchanged; there
is no check in the hot path. Copies are needed because later code may
overwrite an array in place (the ReLU writes over ``c_fc``'s fresh output).

Each call of a captured module appends one array, so a capture around
several forwards keeps them all: ``acts[name]`` is the latest,
``acts.all(name)`` the list in call order, ``acts.pop(name)`` takes the list
and frees it (for long loops).
"""
from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager

#: The extra points beyond module outputs: (module class name, suffix) -> (child to wrap or None, what to record).
#: "input": the first positional argument of the wrapped forward; "output": its result;
#: "attr:NAME": the module's attribute NAME after its forward returned.
_EXTRA_POINTS = {
    ("Block", "resid_mid"): ("ln_2", "input"),
    ("MultiHeadAttention", "weights"): (None, "attr:weights"),
    ("FeedForward", "hidden"): ("c_proj", "input"),
}


def capture_points(model) -> dict:
    """Every capture point of ``model``: name -> (module to wrap, what to record), in forward order of the tree."""
    points = {}
    for path, module in model.named_modules():
        if not path:
            continue  # the model itself: its output is the logits, already returned
        if callable(getattr(type(module), "forward", None)):
            points[path] = (module, "output")
        for (cls_name, suffix), (child, what) in _EXTRA_POINTS.items():
            if type(module).__name__ == cls_name:
                target = getattr(module, child, None) if child else module
                if target is not None:
                    points[f"{path}.{suffix}"] = (target, what)
    return points


def _summarise(names):
    """Valid names with layer numbers folded: transformer.h.{0..5}.attn (for the error message)."""
    folded, seen = [], set()
    numbers = {}
    for name in names:
        key = re.sub(r"\.(\d+)(?=\.|$)", ".{i}", name)
        numbers.setdefault(key, []).append(re.findall(r"\.(\d+)(?=\.|$)", name))
        if key not in seen:
            seen.add(key)
            folded.append(key)
    out = []
    for key in folded:
        ids = sorted({int(n[0]) for n in numbers[key] if n})
        out.append(key.replace("{i}", f"{{{ids[0]}..{ids[-1]}}}", 1) if ids else key)
    return out


def match_points(model, patterns) -> list:
    """The capture point names matching ``patterns`` (segment-wise fnmatch), in the model's order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    points = capture_points(model)
    chosen = []
    for pattern in patterns:
        parts = pattern.split(".")
        hits = [n for n in points
                if len(n.split(".")) == len(parts) and all(fnmatch.fnmatchcase(s, p) for s, p in zip(n.split("."), parts))]
        if not hits:
            listing = "\n  ".join(_summarise(points))
            raise KeyError(f"capture: {pattern!r} matches no capture point of {type(model).__name__}; "
                           f"valid names ('*' matches within one dotted segment):\n  {listing}")
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(points)}
    return sorted(chosen, key=order.__getitem__)


class Activations:
    """What a capture recorded: name -> list of arrays, one per call, in call order."""

    def __init__(self, names):
        self.names = list(names)
        self._store = {n: [] for n in self.names}

    def _record(self, name, value):
        self._store[name].append(value.copy())

    def _check(self, name):
        if name not in self._store:
            raise KeyError(f"{name!r} was not captured; captured: {self.names}")

    def __getitem__(self, name):
        """The latest array recorded under ``name``."""
        self._check(name)
        if not self._store[name]:
            raise KeyError(f"{name!r} was captured but its module has not run yet")
        return self._store[name][-1]

    def all(self, name) -> list:
        """Every array recorded under ``name``, in call order."""
        self._check(name)
        return list(self._store[name])

    def pop(self, name) -> list:
        """Every array recorded under ``name``, forgetting them."""
        self._check(name)
        out, self._store[name] = self._store[name], []
        return out

    def clear(self):
        for n in self._store:
            self._store[n] = []

    def __contains__(self, name):
        return name in self._store

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def items(self):
        """(name, latest array) for every name that has run."""
        return [(n, v[-1]) for n, v in self._store.items() if v]


def _make_wrapper(module, records, acts):
    """A forward that calls the class's own forward and records what ``records`` asks for."""
    original = type(module).forward

    def forward(*args, **kwargs):
        for name, what in records:
            if what == "input":
                acts._record(name, args[0])
        out = original(module, *args, **kwargs)
        for name, what in records:
            if what == "output":
                acts._record(name, out)
            elif what.startswith("attr:"):
                acts._record(name, getattr(module, what[5:]))
        return out

    return forward


@contextmanager
def capture(model, patterns):
    """Record the activations named by ``patterns`` during the ``with`` block (see the module docstring)."""
    names = match_points(model, patterns)
    points = capture_points(model)
    acts = Activations(names)
    by_module = {}
    for name in names:
        module, what = points[name]
        by_module.setdefault(id(module), (module, []))[1].append((name, what))
    wrapped = []
    try:
        for module, records in by_module.values():
            if "forward" in module.__dict__:
                raise RuntimeError(f"capture: {type(module).__name__} is already being captured (nested capture "
                                   f"of the same module is not supported)")
            object.__setattr__(module, "forward", _make_wrapper(module, records, acts))
            wrapped.append(module)
        yield acts
    finally:
        for module in wrapped:
            del module.__dict__["forward"]
