"""Training: the one training step and what every workflow shares (``loop``).

    loop.train_step      zero_grad; forward/backward per micro-batch; clip; optimizer step
    loop.evaluating      eval mode for a block, restored even on an error
    loop.progress        the progress bar of every long command
    loop.windows_loss    the loss of a model over a token array (the one text evaluator)

The workflows built on it: ``npflux.train`` (a GPT on text), ``npflux.train_seq2seq``
(an encoder-decoder on a generated task), ``npflux.finetune`` (LoRA adapters) and
``npflux.interp`` (sparse autoencoders on activations).
"""
from .loop import evaluating, progress, train_step, windows_loss

__all__ = ["evaluating", "progress", "train_step", "windows_loss"]
