"""Training: the one training step, and one short ``train()`` per workflow on top of it.

    loop.py      train_step (zero_grad; forward/backward per micro-batch; clip; the divergence guard;
                 optimizer step),
                 evaluating(model), progress bars, RunLog (log.jsonl) and plot_losses (loss.png),
                 windows_loss (the one text evaluator)
    threads.py   a step's batch rows split over the worker threads, one model replica each (train_step
                 uses it by itself where it pays)
    gpt.py       train(): a GPT on text, with evaluation, checkpoints, --resume, log and plot
    seq2seq.py   train_seq2seq(): an encoder-decoder on a generated task
    lora.py      finetune(): LoRA adapters on a trained GPT (and int8 quantization of it)
    sae.py       train_sae(): a sparse autoencoder on a model's activations

The old module names (``npflux.train``, ``npflux.train_seq2seq``, ``npflux.finetune``)
are these modules, kept importable for one release.
"""
from .loop import Diverged, RunLog, evaluating, plot_losses, progress, train_step, windows_loss

__all__ = ["Diverged", "RunLog", "evaluating", "plot_losses", "progress", "train_step", "windows_loss"]
