"""What a checkpoint holds: the registry of kinds, each one's save and load, and ``load_model``.

    kind       holds                                       saved by                  read by
    gpt        a GPT (training adds optimizer, RNG state)  save_gpt, train.train()   npflux sample / eval / finetune / quantize
    gpt-int8   a GPT with int8 block linears               save_quantized            the same
    gpt-lora   LoRA adapters only; names its base          save_adapter              the same
    gpt-distilled  a GPT distilled from a teacher (+ T, alpha, the teacher)  training.distill.distill  the same
    seq2seq    an encoder-decoder transformer              save_seq2seq              npflux seq2seq decode / eval
    sae        a sparse autoencoder                        save_sae                  npflux sae features
    reader     an extractive QA reader and its vocabulary  save_reader               npflux ask --reader

    model, tokenizer, ckpt = load_model("out/ckpt")                    # any kind
    model, tokenizer, ckpt = load_model("out/ckpt", expect=GPT_KINDS)  # another kind: a one-line WrongKind

Every save writes meta.json's ``kind``. A checkpoint written before that
field existed is recognised by its config, by the rules the loaders of that
time used; the first rule that matches wins, in the order of ``KINDS``:

    sae        the config has "sae"
    reader     the config has "reader"
    seq2seq    config["model_type"] == "seq2seq"
    gpt-lora   the config has "adapter"
    gpt-distilled  the config has "distill"
    gpt-int8   the config has "quantization"
    gpt        the config has "model"

A new kind is a save function, a load function and one more ``Kind`` in
``KINDS``. Tokenizers are imported inside the loaders, so that importing
``npflux.checkpoint`` loads none.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..models import GPT, GPTConfig
from ..models.reader import Reader, ReaderConfig
from ..models.sae import SAEConfig, SparseAutoencoder
from ..models.seq2seq import MODEL_TYPE, Seq2SeqConfig, Seq2SeqTransformer
from ..nn.convert import apply_lora, refresh_flat_parameters, set_submodule
from ..nn.lora import lora_modules, lora_parameters
from ..nn.quant import QuantizedLinear, named_buffers
from . import MODEL_FILE, CheckpointError, load_checkpoint, read_meta, save_checkpoint, sha256_file

GPT_KINDS = ("gpt", "gpt-int8", "gpt-lora", "gpt-distilled")


class WrongKind(CheckpointError):
    """A checkpoint of another kind than the caller can use (the message names the command that reads it)."""


def _tokenizer(ckpt):
    if not ckpt.tokenizer:
        return None
    from ..tokenizers import load_tokenizer  # here: importing npflux.checkpoint loads no tokenizer

    return load_tokenizer(ckpt.tokenizer)


def _train_dtype(ckpt):
    return (ckpt.config.get("train") or {}).get("dtype", "float32")


# ---------------------------------------------------------------------------
# gpt: config {"model": GPTConfig, "train": {... "dtype"}}
# ---------------------------------------------------------------------------


def save_gpt(directory, model, tokenizer=None, train: dict | None = None, extra=None, step=0,
             optimizer_state=None, rng_state=None):
    """A GPT's checkpoint. ``train`` is its training config (loading builds the model in its ``dtype``).

    ``npflux.train.train`` writes the same layout with ``save_checkpoint(kind="gpt")``, adding the
    optimizer and RNG state that resuming needs.
    """
    if any(isinstance(m, QuantizedLinear) for _, m in model.named_modules()) or lora_modules(model):
        raise ValueError("save_gpt: the model has int8 layers or LoRA adapters; save it with save_quantized "
                         "or save_adapter")
    config = {"model": model.config.to_dict(), "train": {**(train or {}), "dtype": model.dtype.name}}
    return save_checkpoint(directory, model.state_dict(), config, tokenizer=tokenizer, optimizer_state=optimizer_state,
                           step=step, rng_state=rng_state, extra=extra, kind="gpt")


def _check_gpt_sizes(config: GPTConfig, state: dict, directory):
    """The config's sizes are the arrays' (before a model is built: an n_embd edited to 10**8 in meta.json
    must be one line, not an attempt to allocate the model it describes)."""
    expected = {"transformer.wte.weight": (config.vocab_size, config.n_embd),
                "transformer.wpe.weight": (config.block_size, config.n_embd)}
    for name, shape in expected.items():
        found = tuple(state[name].shape) if name in state else None
        if found != shape:
            raise CheckpointError(f"{directory}: the config says {name} is {shape}, the arrays hold {found}")
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    # (counted, not compared with set(range(n_layer)): an n_layer of 10**9 must not build that set)
    if len(layers) != config.n_layer or layers and (min(layers) != 0 or max(layers) != config.n_layer - 1):
        raise CheckpointError(f"{directory}: the config says n_layer {config.n_layer}, the arrays hold "
                              f"{len(layers)} blocks")


def _load_gpt(ckpt, directory, backend=None, dtype=None):
    config = GPTConfig.from_dict(ckpt.config["model"])
    _check_gpt_sizes(config, ckpt.model_state, directory)
    model = GPT(config, backend=backend, dtype=dtype or _train_dtype(ckpt))
    model.load_state_dict(ckpt.model_state)
    return model, _tokenizer(ckpt)


# ---------------------------------------------------------------------------
# gpt-distilled: a gpt checkpoint whose config also has {"distill": {temperature, alpha, teacher}}
# ---------------------------------------------------------------------------


def save_distilled(directory, model, distill: dict, tokenizer=None, train: dict | None = None, extra=None, step=0):
    """A distilled student's checkpoint: ``save_gpt``'s layout plus ``distill`` (temperature, alpha and the
    teacher: its model config, path and SHA-256), kind ``gpt-distilled``; it loads as any GPT.

    ``npflux.training.distill.distill`` writes the same layout through ``train``, adding what resuming needs.
    """
    config = {"model": model.config.to_dict(), "train": {**(train or {}), "dtype": model.dtype.name},
              "distill": distill}
    return save_checkpoint(directory, model.state_dict(), config, tokenizer=tokenizer, step=step, extra=extra,
                           kind="gpt-distilled")


# ---------------------------------------------------------------------------
# gpt-int8: model.safetensors holds int8 weights, float32 scales and the float rest;
# the config is the float checkpoint's plus {"quantization": {...}}
# ---------------------------------------------------------------------------


def save_quantized(directory, model, config: dict, tokenizer=None, extra=None):
    """A checkpoint of a quantized model: int8 weights, float32 scales and every float array left.

    ``config`` is the float checkpoint's; its "quantization" entry lists the
    int8 layers and their group size (None: per output channel).
    """
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no int8 layers (quantize_model first)")
    if lora_modules(model):  # the checkpoint would not load: save the adapters with save_adapter
        raise ValueError("save_quantized: the model has LoRA adapters; save them with save_adapter over the "
                         "int8 base's checkpoint, or merge_lora and quantize_model to bake them in")
    group_sizes = sorted({str(m.group_size) for m in layers.values()})
    if len(group_sizes) > 1:
        raise ValueError(f"save_quantized: layers quantized with different group sizes {group_sizes}")
    state = {**model.state_dict(), **named_buffers(model)}
    config = {**config, "quantization": {"bits": 8, "scheme": "symmetric",
                                         "group_size": next(iter(layers.values())).group_size,
                                         "layers": list(layers)}}
    return save_checkpoint(directory, model_state=state, config=config, tokenizer=tokenizer, extra=extra,
                           kind="gpt-int8")


def _quantized_from_state(model, state, quant: dict):
    """Put QuantizedLinear layers built from the saved int8 arrays where the config says, then load the rest."""
    state = dict(state)
    for path in quant["layers"]:
        try:
            q, scale = state.pop(f"{path}.weight_int8"), state.pop(f"{path}.weight_scale")
        except KeyError as exc:
            raise CheckpointError(f"quantized checkpoint has no {exc.args[0]}") from None
        bias = state.pop(f"{path}.bias", None)
        layer = QuantizedLinear(q, scale, bias, backend=model.backend, dtype=model.dtype)
        set_submodule(model, path, layer)
    refresh_flat_parameters(model)
    model.load_state_dict(state)
    return model


def _load_int8(ckpt, directory, backend=None, dtype=None):
    config = GPTConfig.from_dict(ckpt.config["model"])
    _check_gpt_sizes(config, ckpt.model_state, directory)  # (embeddings stay float in an int8 model)
    model = GPT(config, backend=backend, dtype=dtype or _train_dtype(ckpt))
    return _quantized_from_state(model, ckpt.model_state, ckpt.config["quantization"]), _tokenizer(ckpt)


# ---------------------------------------------------------------------------
# gpt-lora: model.safetensors holds ONLY the adapters' A and B; config["adapter"] names
# the base checkpoint (path and SHA-256 of its model.safetensors), rank, alpha, targets
# ---------------------------------------------------------------------------


def save_adapter(directory, model, base_checkpoint, lora: dict, tokenizer=None, train: dict | None = None,
                 extra=None):
    """An adapter-only checkpoint: the adapters' A and B, and the base checkpoint they belong to.

    ``lora`` holds rank, alpha, targets and seed: loading re-applies it, so it
    must describe the model's adapters (checked here, or they would load with
    another scaling, or not at all). The base is recorded by its absolute path,
    its path relative to the adapter (so the two can move together) and the
    SHA-256 of its model.safetensors, which loading checks.
    """
    _check_adapter_description(model, lora)
    base = Path(base_checkpoint).resolve()
    adapter = {**lora, "base_checkpoint": str(base), "base_sha256": sha256_file(base / MODEL_FILE)}
    try:
        adapter["base_relative"] = os.path.relpath(base, Path(directory).resolve())
    except ValueError:  # another drive (Windows): only the absolute path
        pass
    base_config = json.loads((base / "meta.json").read_text(encoding="utf-8"))["config"]
    _check_base(model, base_config, base)
    # The base's document separator, so `npflux eval` of the adapter packs text as the base (and finetune) did.
    train = {**(train or {}), "doc_sep": base_config.get("train", {}).get("doc_sep")}
    config = {"model": model.config.to_dict(), "adapter": adapter, "train": train}
    return save_checkpoint(directory, model_state=lora_parameters(model), config=config, tokenizer=tokenizer,
                           extra=extra, kind="gpt-lora")


def _check_base(model, base_config, base):
    """The base checkpoint must be the model the adapters sit on: same architecture, same kind (float / int8)."""
    if GPTConfig.from_dict(base_config["model"]) != model.config:
        raise ValueError(f"save_adapter: {base} holds a different model ({base_config['model']}) from this one")
    int8_model = any(isinstance(m, QuantizedLinear) for _, m in model.named_modules())
    if int8_model != ("quantization" in base_config):  # loading would put the adapters on the other kind of base
        raise ValueError(f"save_adapter: the model's base is {'int8' if int8_model else 'float'}, but {base} is "
                         f"{'an int8' if 'quantization' in base_config else 'a float'} checkpoint")


def _check_adapter_description(model, lora):
    """``lora`` (rank, alpha, targets) re-applied to a fresh model must give exactly this model's adapters."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    for path, m in layers:
        if m.rank != lora["rank"] or m.alpha != float(lora["alpha"]):
            raise ValueError(f"save_adapter: {path} has rank {m.rank} and alpha {m.alpha}, "
                             f"but the description says rank {lora['rank']} and alpha {lora['alpha']}")
    again = GPT(model.config, backend=model.backend)  # what loading will build
    apply_lora(again, lora["targets"], rank=lora["rank"], alpha=lora["alpha"])
    expected = {k: v.shape for k, v in lora_parameters(again).items()}
    if expected != {k: v.shape for k, v in lora_parameters(model).items()}:
        raise ValueError(f"save_adapter: targets {list(lora['targets'])} do not give the model's adapters "
                         f"({', '.join(path for path, _ in layers[:4])}{' ...' if len(layers) > 4 else ''})")


def _base_of(adapter: dict, directory, base_checkpoint=None) -> Path:
    """The base's directory: the one given, else the recorded absolute path, else the recorded relative one."""
    if base_checkpoint is not None:
        return Path(base_checkpoint)
    recorded = Path(adapter["base_checkpoint"])
    if not (recorded / MODEL_FILE).is_file() and adapter.get("base_relative"):
        beside = Path(directory) / adapter["base_relative"]
        if (beside / MODEL_FILE).is_file():
            return beside
    return recorded


def _load_lora(ckpt, directory, backend=None, dtype=None, base_checkpoint=None):
    """The base checkpoint (float or int8) with the adapters applied; the base's tokenizer."""
    adapter = ckpt.config["adapter"]
    base_dir = _base_of(adapter, directory, base_checkpoint)
    if not (base_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"adapter {directory}: its base checkpoint {base_dir} is not there (moved? "
                              f"npflux.checkpoint.load_adapter({str(directory)!r}, base_checkpoint=NEW_PATH) loads it "
                              f"from its new place; the SHA-256 is still checked)")
    actual = sha256_file(base_dir / MODEL_FILE)
    if actual != adapter["base_sha256"]:
        raise CheckpointError(f"adapter {directory} was trained on a base whose model.safetensors has SHA-256 "
                              f"{adapter['base_sha256']}, but {base_dir} has {actual}: a different model")
    model, tokenizer, _ = load_model(base_dir, backend=backend, dtype=dtype, expect=("gpt", "gpt-int8"))
    apply_lora(model, adapter["targets"], rank=adapter["rank"], alpha=adapter["alpha"], seed=adapter.get("seed", 0))
    params = lora_parameters(model)
    if set(params) != set(ckpt.model_state):
        raise CheckpointError(f"adapter {directory}: its arrays {sorted(ckpt.model_state)[:4]} ... do not match "
                              f"the adapters its config describes {sorted(params)[:4]} ...")
    model.load_state_dict(ckpt.model_state, strict=False)
    return model, tokenizer


def load_adapter(directory, base_checkpoint=None, backend=None, dtype=None):
    """(model, tokenizer): the base checkpoint with the adapter of ``directory`` applied.

    ``base_checkpoint`` overrides the base's recorded path (its SHA-256 must still match).
    """
    model, tokenizer, _ = load_model(directory, backend, dtype, expect=("gpt-lora",), base_checkpoint=base_checkpoint)
    return model, tokenizer


# ---------------------------------------------------------------------------
# seq2seq: config {"model_type": "seq2seq", "model": Seq2SeqConfig, "dtype": ...}
# ---------------------------------------------------------------------------


def save_seq2seq(directory, model, tokenizer, extra=None, step=0):
    """A checkpoint whose config says ``model_type: seq2seq`` (how loaders told it apart before ``kind``)."""
    return save_checkpoint(directory, model.state_dict(),
                           config={"model_type": MODEL_TYPE, "model": model.config.to_dict(),
                                   "dtype": model.dtype.name},
                           tokenizer=tokenizer.to_dict(), step=step, extra=extra, kind="seq2seq")


def _load_seq2seq(ckpt, directory, backend=None, dtype=None):
    model = Seq2SeqTransformer(Seq2SeqConfig.from_dict(ckpt.config["model"]), backend=backend,
                               dtype=dtype or ckpt.config.get("dtype", "float32"))
    model.load_state_dict(ckpt.model_state)
    return model, _tokenizer(ckpt)


def load_seq2seq(directory, backend=None, dtype=None):
    """(model, tokenizer, checkpoint) from a checkpoint written by ``save_seq2seq``."""
    return load_model(directory, backend, dtype, expect=("seq2seq",))


# ---------------------------------------------------------------------------
# sae: config {"sae": SAEConfig, "source": where its activations came from}; no tokenizer
# ---------------------------------------------------------------------------


def save_sae(directory, sae, source: dict, metrics: dict | None = None):
    """Write the SAE as an npflux checkpoint: weights in safetensors, config and provenance in JSON.

    ``source`` says where its activations came from: checkpoint, point
    (capture name), input_scale, context.
    """
    return save_checkpoint(directory, sae.state_dict(), {"sae": sae.config.to_dict(), "source": source},
                           extra={"metrics": metrics or {}}, kind="sae")


def _load_sae(ckpt, directory, backend=None, dtype=None):
    sae = SparseAutoencoder(SAEConfig(**ckpt.config["sae"]), backend=backend, dtype=dtype)
    sae.load_state_dict(ckpt.model_state)
    return sae, None


def load_sae(directory, backend=None, dtype=None):
    """(sae, source, metrics) from a directory written by ``save_sae``."""
    sae, _, ckpt = load_model(directory, backend, dtype, expect=("sae",))
    return sae, ckpt.config.get("source", {}), (ckpt.extra or {}).get("metrics", {})


# ---------------------------------------------------------------------------
# reader: config {"reader": ReaderConfig, "vocab": ReaderVocab.to_dict(), "train": {...}}; no tokenizer
# ---------------------------------------------------------------------------


def save_reader(directory, reader, vocab, train: dict | None = None, extra=None, optimizer_state=None, step=0,
                rng_state=None):
    """An extractive reader: its weights, ReaderConfig and word vocabulary (which is its tokenizer);
    training adds the optimizer, the step and the question generator's RNG state, for ``--resume``."""
    if vocab.size != reader.config.vocab_size:
        raise ValueError(f"save_reader: the vocabulary has {vocab.size} ids, the reader {reader.config.vocab_size}")
    config = {"reader": reader.config.to_dict(), "vocab": vocab.to_dict(),
              "train": {**(train or {}), "dtype": reader.dtype.name}}
    return save_checkpoint(directory, reader.state_dict(), config, optimizer_state=optimizer_state, step=step,
                           rng_state=rng_state, extra=extra, kind="reader")


def _load_reader(ckpt, directory, backend=None, dtype=None):
    reader = Reader(ReaderConfig.from_dict(ckpt.config["reader"]), backend=backend,
                    dtype=dtype or _train_dtype(ckpt))
    reader.load_state_dict(ckpt.model_state)
    from ..tokenizers.words import ReaderVocab  # here: importing npflux.checkpoint loads no tokenizer

    return reader, ReaderVocab.from_dict(ckpt.config["vocab"])


def load_reader(directory, backend=None, dtype=None):
    """(reader, vocabulary) from a checkpoint written by ``save_reader``."""
    reader, vocab, _ = load_model(directory, backend, dtype, expect=("reader",))
    return reader, vocab


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of checkpoint: how it is recognised, written and read, and which command reads it."""

    name: str                          # meta.json's "kind"
    what: str                          # for messages: "a GPT"
    command: str                       # the command that reads it; {path} is the checkpoint
    recognise: Callable[[dict], bool]  # a checkpoint without "kind" is this kind when its config matches
    save: Callable                     # writes one
    load: Callable                     # (ckpt, directory, backend, dtype, **options) -> (model, tokenizer)


_GPT_COMMAND = "npflux sample --checkpoint {path}"
KINDS = {k.name: k for k in (  # in the order old checkpoints are recognised
    Kind("sae", "a sparse autoencoder", "npflux sae features --sae {path} --out REPORT",
         lambda c: "sae" in c, save_sae, _load_sae),
    Kind("reader", "an extractive reader", "npflux ask --reader {path} --docs FILE QUESTION",
         lambda c: "reader" in c, save_reader, _load_reader),
    Kind("seq2seq", "a seq2seq model", "npflux seq2seq decode --checkpoint {path} SOURCE...",
         lambda c: c.get("model_type") == MODEL_TYPE, save_seq2seq, _load_seq2seq),
    Kind("gpt-lora", "a GPT's LoRA adapters", _GPT_COMMAND, lambda c: "adapter" in c, save_adapter, _load_lora),
    Kind("gpt-int8", "an int8 GPT", _GPT_COMMAND, lambda c: "quantization" in c, save_quantized, _load_int8),
    Kind("gpt-distilled", "a distilled GPT", _GPT_COMMAND, lambda c: "distill" in c, save_distilled, _load_gpt),
    Kind("gpt", "a GPT", _GPT_COMMAND, lambda c: "model" in c, save_gpt, _load_gpt),
)}


def infer_kind(config) -> str | None:
    """The kind of a checkpoint written before meta.json had one, from its config (None: no model kind)."""
    if not isinstance(config, dict):
        return None
    return next((k.name for k in KINDS.values() if k.recognise(config)), None)


def _kind_of(directory, meta: dict) -> str:
    kind = meta.get("kind") or infer_kind(meta.get("config"))
    if kind is None:
        raise CheckpointError(f"{directory} holds no model: its meta.json names no kind and its config matches "
                              f"none of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise CheckpointError(f"{directory} is a {kind!r} checkpoint, a kind this npflux does not know "
                              f"(it reads {', '.join(KINDS)}); a newer npflux wrote it?")
    return kind


def kind_at(directory) -> str:
    """The kind of the checkpoint at ``directory``, from its meta.json alone (no array is read)."""
    return _kind_of(directory, read_meta(directory)[1])


def _wrong_kind(directory, found: str, expect) -> WrongKind:
    wanted = "a GPT" if len(expect) > 1 and set(expect) <= set(GPT_KINDS) else \
        " or ".join(KINDS[k].what for k in expect)
    kind = KINDS[found]
    return WrongKind(f"{directory} holds {kind.what} (checkpoint kind {found!r}), not {wanted}; "
                     f"use `{kind.command.format(path=directory)}`")


def model_from(ckpt, directory, backend=None, dtype=None, expect=None, **options):
    """(model, tokenizer) from a checkpoint already read (``load_checkpoint``); see ``load_model``."""
    kind = _kind_of(directory, {"kind": ckpt.kind, "config": ckpt.config})
    if expect is not None and kind not in expect:
        raise _wrong_kind(directory, kind, expect)
    try:
        return KINDS[kind].load(ckpt, directory, backend=backend, dtype=dtype, **options)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # meta.json's fields reach the loader unchecked beyond their top-level types: any damage
        # below that (a missing, null or re-typed field; arrays that do not fit the config) ends here
        detail = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
        raise CheckpointError(f"{directory} does not load as {KINDS[kind].what}: {detail.splitlines()[0]}") from exc


def load_model(directory, backend=None, dtype=None, *, expect=None, **options):
    """(model, tokenizer, checkpoint) for a checkpoint of any kind, on any backend.

    ``dtype`` defaults to the one the model was saved in. ``expect`` lists
    the kinds the caller can use (e.g. ``GPT_KINDS``): any other is a
    ``WrongKind`` error naming the kind found and the command that reads it,
    raised before any array is read. ``options`` go to the kind's loader
    (``base_checkpoint=`` for an adapter whose base moved). An SAE has no
    tokenizer (None).
    """
    where, meta = read_meta(directory)  # the kind first: a wrong one costs no hashing of large files
    kind = _kind_of(directory, meta)
    if expect is not None and kind not in expect:
        raise _wrong_kind(directory, kind, expect)
    ckpt = load_checkpoint(where, optimizer=False)  # (a model needs no optimizer state; resuming reads it)
    return (*model_from(ckpt, directory, backend, dtype, **options), ckpt)


__all__ = ["GPT_KINDS", "KINDS", "Kind", "WrongKind", "infer_kind", "kind_at", "load_adapter", "load_model",
           "load_reader", "load_sae", "load_seq2seq", "model_from", "save_adapter", "save_distilled", "save_gpt",
           "save_quantized", "save_reader", "save_sae", "save_seq2seq"]
