"""Model surgery: swap a model's linear layers for LoRA, frozen or int8 ones.

The layers themselves live below: ``quant`` (FrozenLinear, QuantizedLinear
and the int8 arithmetic) and ``lora`` (LoRALinear, built on a frozen base).
What walks a model and replaces its layers needs all of them, so it lives
here, above both: ``quant`` and ``lora`` never import this module, and
neither imports the other's replacement code (they once imported each other).
"""
import fnmatch
import re

from ..backend import get_backend
from .layers import Linear
from .lora import FUSED_BLOCKS, LoRALinear
from .quant import FrozenLinear, QuantizedLinear


def set_submodule(root, path, new):
    """Put ``new`` where the module at dotted ``path`` is (the parent's attribute, so its structure version moves)."""
    parent_path, _, name = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else []:
        parent = parent._children[part]
    if name not in parent._children:
        raise KeyError(f"no submodule {path!r}")
    setattr(parent, name, new)


def path_matches(path, pattern):
    """fnmatch on the dotted path; a pattern without a leading wildcard also matches as a suffix
    ("attn.c_attn" matches "transformer.h.3.attn.c_attn")."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)


def quantize_linears(model, group_size=None, targets=("*",)):
    """Replace every Linear / FrozenLinear whose path matches a pattern in ``targets`` by a QuantizedLinear.

    A LoRA layer must be merged first (``merge_lora``): the whole layer is
    then replaced by the int8 copy of its merged weight, so the fine-tuned
    model is what gets quantized. An unmerged one is an error (its adapter
    would be lost or left float). Returns the quantized paths. The model's
    parameter buffers are rebuilt (``flatten_parameters``) when it had them,
    so ``zero_grad`` and the optimizer see exactly the parameters that remain.
    """
    done = []
    for path, m in list(model.named_modules()):
        if any(path.startswith(p + ".") for p in done):
            continue  # the frozen base inside a LoRA layer just replaced
        if not any(path_matches(path, t) for t in targets):
            continue
        if isinstance(m, LoRALinear):
            if not (m.merged and isinstance(m.base, FrozenLinear)):
                raise ValueError(f"quantize: {path} has an unmerged LoRA adapter; merge_lora(model) first "
                                 f"(or quantize before apply_lora, for QLoRA)")
            m = m.base
        if isinstance(m, (Linear, FrozenLinear)):
            set_submodule(model, path, QuantizedLinear.from_linear(m, group_size))
            done.append(path)
    if not done:
        raise ValueError(f"quantize: no linear layer matches {list(targets)}")
    refresh_flat_parameters(model)
    return done


def refresh_flat_parameters(model):
    """After layers were swapped: one buffer for the parameters that are left, if the model used one."""
    if getattr(model, "_flat_grads", None) is not None:
        object.__setattr__(model, "_flat_grads", None)
        if model.params:
            model.flatten_parameters()


def parse_target(target):
    """"attn.c_attn[q,v]" -> ("attn.c_attn", ("q", "v")); "mlp.c_fc" -> ("mlp.c_fc", None)."""
    match = re.fullmatch(r"(.+)\[([\w,\s]+)\]", target.strip())
    if not match:
        return target.strip(), None
    return match.group(1), tuple(b.strip() for b in match.group(2).split(",") if b.strip())


def _blocks_of(path, module, parts):
    """{name: (start, stop)} for the requested parts of a fused projection (None: the whole layer)."""
    if parts is None:
        return None
    layer = path.rpartition(".")[2]
    names = FUSED_BLOCKS.get(layer)
    if names is None or any(p not in names for p in parts):
        raise ValueError(f"apply_lora: {path} has no parts {list(parts)}; fused layers and their parts: {FUSED_BLOCKS}")
    width = module.shape[1] // len(names)
    return {p: (names.index(p) * width, (names.index(p) + 1) * width) for p in parts}


def apply_lora(model, targets, rank=8, alpha=None, seed=0):
    """Put LoRA adapters on the linear layers whose dotted paths match ``targets`` (fnmatch patterns).

    A pattern may name parts of a fused projection: "attn.c_attn[q,v]" puts
    separate adapters on the q and v column blocks of c_attn only (the LoRA
    paper's choice). Every OTHER linear layer is frozen too (a FrozenLinear),
    so no linear weight of the model has a gradient array any more; the
    adapters' A and B are the model's only linear-layer parameters.
    Embeddings, layer norms and a GPT's lm_head keep theirs: pass
    ``lora_parameters(model)`` to the optimizer so that only the adapters
    train. A pattern that matches no linear layer, or two patterns that
    match one layer, are errors. Returns the adapted paths.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("apply_lora: give at least one target pattern (e.g. 'attn.c_attn')")
    parsed = [parse_target(t) for t in targets]
    rng = get_backend("numpy").rng(seed)
    linears = [(path, m) for path, m in model.named_modules()
               if isinstance(m, (Linear, FrozenLinear, QuantizedLinear, LoRALinear))]
    if any(isinstance(m, LoRALinear) for _, m in linears):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    unmatched = [t for t, (pattern, _) in zip(targets, parsed) if not any(path_matches(path, pattern) for path, _ in linears)]
    if unmatched:
        raise ValueError(f"apply_lora: no linear layer matches {unmatched}; linear layers are "
                         f"{', '.join(path for path, _ in linears[:8])}{' ...' if len(linears) > 8 else ''}")
    adapted = []
    for path, m in linears:
        base = FrozenLinear.from_linear(m) if isinstance(m, Linear) else m
        hits = [parts for pattern, parts in parsed if path_matches(path, pattern)]
        if len(hits) > 1:
            raise ValueError(f"apply_lora: {path} is matched by more than one target pattern {targets}")
        if hits:
            base = LoRALinear(base, rank, alpha, rng=rng, blocks=_blocks_of(path, base, hits[0]))
            adapted.append(path)
        if base is not m:
            set_submodule(model, path, base)
    refresh_flat_parameters(model)
    return adapted
