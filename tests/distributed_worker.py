"""One training run for tests/test_distributed.py, on one process or under ``mpiexec -n N``.

    python tests/distributed_worker.py '{"out_dir": ..., "dtype": "float64", ...}'
    mpiexec -n 2 python tests/distributed_worker.py '{...}'

It trains a tiny GPT on a synthetic corpus (no data files) through
``npflux.train``, the same function ``npflux train`` calls, and writes what
the test compares: ``losses.json`` (the loss of every step, from rank 0)
and ``params_rank{r}.npy`` (each rank's final flat parameters, to check the
ranks agree). ``fail_rank``/``fail_step``/``fail_how`` make one rank raise,
or kill itself, at a step (the failure tests).
"""
import json
import os
import signal
import sys

import numpy as np

import npflux.training.gpt as gpt_training
from npflux import distributed
from npflux.models import GPTConfig
from npflux.training.gpt import TrainConfig, train


def corpus(n=6000, vocab=23, seed=0):
    """Token ids with some structure to learn (a noisy walk over the vocabulary), the same on every rank."""
    rng = np.random.default_rng(seed)
    steps = rng.choice([1, 1, 2, 5], size=n)
    return (np.cumsum(steps) % vocab).astype(np.uint16)


def main(spec):
    comm = distributed.world(spec.get("backend") or "numpy")  # (cupy: NCCL between the GPUs)
    parallel = distributed.DataParallel(comm, zero=spec.get("zero", 0), overlap=spec.get("overlap", True),
                                        bucket_mb=spec.get("bucket_mb", 0.004))
    ids = corpus()
    model_config = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16,
                             tie_weights=spec.get("tie_weights", True), qkv_bias=spec.get("qkv_bias", True))
    keys = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{"out_dir": spec["out_dir"], "batch_size": 10, "max_iters": 20, "eval_interval": 10,
                         "eval_iters": 3, "learning_rate": 3e-3, "checkpoint_interval": 0, "progress": False,
                         "dtype": "float64", **{k: v for k, v in spec.items() if k in keys}})

    losses = []
    step_of = gpt_training.train_step

    def recording_step(*args, **kwargs):
        state_step = len(losses)
        if comm.rank == spec.get("fail_rank", -1) and spec.get("fail_step") == state_step:
            if spec.get("fail_how") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {state_step}")
        loss, norm = step_of(*args, **kwargs)
        losses.append(loss)
        return loss, norm

    gpt_training.train_step = recording_step
    if spec.get("resume"):
        losses.extend([None] * spec["resume_step"])
    model, state = train(model_config, cfg, ids[:5000], ids[5000:], resume=spec.get("resume", False),
                         log=lambda *a: None, parallel=parallel)
    flat = distributed.flat_buffers(model)[0]
    np.save(os.path.join(cfg.out_dir, f"params_rank{comm.rank}.npy"), flat)
    if comm.rank == 0:
        with open(os.path.join(cfg.out_dir, "losses.json"), "w") as f:
            json.dump({"losses": losses, "history": state.history, "ranks": comm.size}, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
