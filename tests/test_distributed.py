"""Data-parallel training (npflux.distributed): N ranks train the run one process trains.

The MPI tests start ``mpiexec -n 2`` and ``-n 3`` (oversubscribed on a 2-core
machine: MPICH starts more ranks than cores without complaint) on
``tests/distributed_worker.py``, a tiny GPT (2 layers, n_embd 16) for 20
steps on a synthetic corpus, and compare with the same script on one process.
The batch is the global one (10 rows: 5 + 5 on two ranks, 4 + 3 + 3 on
three, so uneven shares are covered).

Tolerances, from the arithmetic. Data parallelism changes only the order of
additions: a gradient element, the sum of B*T row terms, becomes each rank's
partial sum, then the ranks' sums added (and each rank's backward is scaled
by its share b_r/B, not 1/B: one more rounding). Each reordering moves a sum
by a few units of roundoff u of its terms' magnitudes (u = 1.1e-16 in
float64, 6.0e-8 in float32). AdamW turns a relative error of a gradient into
about the same relative error of its step (m / sqrt(v) is homogeneous of
degree 0 in g), so over 20 steps the parameters move apart by some tens of
u relative, and the losses likewise. The bounds: 1e-12 in float64 (about
1e4 u, measured 4e-15) and 1e-6 in float32 (about 16 u, measured 1e-7).

One parameter escapes that argument, and the float32 comparison leaves it
out (``qkv_bias=False``, as the char presets are built): the bias of the
attention keys has an exactly zero gradient (it adds q.b to every score of a
query row, and softmax ignores a constant), so its computed gradient is pure
rounding noise, different in every reduction order. AdamW divides by
sqrt(v) + eps: float64 noise (1e-18) is far below eps = 1e-8 and moves
nothing, but float32 noise (1e-10..1e-9) becomes steps of up to lr/10, and
that bias then differs by 1e-5 between ANY two float32 runs that add in
another order (one process against float64 too), data-parallel or not.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npflux import distributed, optim
from npflux.backend import cupy_available
from npflux.data import get_batch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "NPFLUX_MPI_RANKS")


def _have_mpi4py():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


needs_mpi = pytest.mark.skipif(not (_have_mpi4py() and MPIEXEC),
                               reason='MPI is not installed (mpi4py and mpiexec: pip install -e ".[mpi]")')


def _env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["NPFLUX_NUM_THREADS"] = "1"  # one thread per rank: the ranks share the cores
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH", "")) if p)
    return env


def launch(n, out_dir, timeout=120, check=True, **spec):
    """Run the worker on ``n`` ranks (n = 1: plain python, no MPI at all); the CompletedProcess."""
    spec["out_dir"] = str(out_dir)
    cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n)] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def result(out_dir):
    """(losses of every step, final parameters, evaluation history) of a run; checks the ranks agree."""
    out_dir = Path(out_dir)
    info = json.loads((out_dir / "losses.json").read_text())
    params = [np.load(out_dir / f"params_rank{r}.npy") for r in range(info["ranks"])]
    for r, p in enumerate(params[1:], 1):
        # Every rank applies the same update to the same all-reduced sum (MPI hands one result to
        # all), so the ranks hold the same bits; a difference would be ranks drifting apart.
        assert np.array_equal(p, params[0]), f"rank {r}'s parameters differ from rank 0's"
    return np.array(info["losses"], dtype=object), params[0], info["history"]


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_run(run, reference, tol, first_step=0):
    losses, params, history = run
    ref_losses, ref_params, ref_history = reference
    assert len(losses) == len(ref_losses) == 20
    got, want = np.array(losses[first_step:], dtype=float), np.array(ref_losses[first_step:], dtype=float)
    assert np.max(np.abs(got - want) / np.abs(want)) <= tol
    assert rel(params, ref_params) <= tol
    assert [e["step"] for e in history] == [e["step"] for e in ref_history]
    for e, f in zip(history, ref_history):
        assert abs(e["val_loss"] - f["val_loss"]) <= tol * abs(f["val_loss"])


# ---------------------------------------------------------------------------
# the pieces, in one process
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("total,size", [(10, 3), (10, 2), (7, 7), (5, 1), (1000003, 64)])
def test_shard_range_splits_evenly_back_to_back(total, size):
    ranges = [distributed.shard_range(total, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert distributed.shard_counts(total, size) == (sizes, [a for a, _ in ranges])


@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_ranks_rows_make_the_one_process_batch(size):
    """Rank-aware sampling: N ranks with the same generator state hold, together, the batch of one
    process, and their generators move on as its does (so the next batches agree too)."""
    data = np.arange(500, dtype=np.uint16)
    whole_rng = np.random.default_rng(3)
    whole = [get_batch(data, 10, 8, whole_rng) for _ in range(2)]
    for step in range(2):
        parts = []
        for r in range(size):
            rng = np.random.default_rng(3)
            for _ in range(step):
                get_batch(data, 10, 8, rng, rows=distributed.shard_range(10, r, size))
            parts.append(get_batch(data, 10, 8, rng, rows=distributed.shard_range(10, r, size)))
        for i in (0, 1):
            assert np.array_equal(np.concatenate([p[i] for p in parts]), whole[step][i])


def test_buckets_tile_the_buffer_from_its_end():
    """The buckets cover the gradient buffer exactly once, back to front (the backward's order), cut at
    parameter boundaries, each at least the bucket size but the last."""
    from npflux.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16), seed=0)
    _, flat_g = distributed.flat_buffers(model)
    bounds = set(np.cumsum([0] + [p.size for p in model.params.values()]).tolist())
    for nbytes in (1, 4000, 10**9):
        cuts = distributed.buckets(model.params, flat_g, nbytes)
        assert cuts[0][1] == flat_g.size and cuts[-1][0] == 0
        assert all(a[0] == b[1] for a, b in zip(cuts, cuts[1:]))
        assert all(a in bounds and b in bounds for a, b in cuts)
        assert all((b - a) * flat_g.itemsize >= nbytes for a, b in cuts[:-1])
    assert len(distributed.buckets(model.params, flat_g, 1)) == len(model.params)


class RecordingComm(distributed.Communicator):
    """Rank 0 of 2 that records every bucket it is asked to all-reduce (and sums nothing)."""
    rank, size, name = 0, 2, "recording"

    def __init__(self):
        self.launched = []

    def iallreduce(self, buf):
        self.launched.append((buf.copy(), buf, self.sync._armed))
        return distributed._Done()


@pytest.mark.parametrize("tie_weights", [True, False])
def test_overlap_launches_each_bucket_during_the_backward_once_it_is_final(tie_weights):
    """The hooks start a bucket's all-reduce while the backward still runs, and only once the backward
    has written that bucket for good: what was sent equals the gradient after the whole backward."""
    from npflux.models import GPT, GPTConfig
    from npflux.training.loop import train_step

    model = GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_weights=tie_weights),
                seed=0, dtype="float64")
    comm = RecordingComm()
    sync = comm.sync = distributed.DataParallelSync(model, distributed.DataParallel(comm, bucket_mb=0.004), 5, 10)
    rng = np.random.default_rng(0)
    batch = get_batch(rng.integers(0, 23, 400), 5, 16, rng)
    train_step(model, optim.SGD(model.params, lr=0.0), [batch, batch], sync=sync)
    assert len(sync.buckets) >= 5
    assert [b[1].size for b in comm.launched] == [hi - lo for lo, hi in sync.buckets]  # each once, back to front
    assert all(armed for *_, armed in comm.launched)  # all of them while the last backward ran
    for sent, buffer, _ in comm.launched:
        assert np.array_equal(sent, buffer) and np.any(sent != 0)


def test_global_norm_across_slices_is_the_whole_norm():
    """ZeRO's clipping: each process's sum of squares, added across them, gives the norm of the whole."""
    g = np.random.default_rng(0).standard_normal(1000)
    slices = [{"a": g[:300]}, {"a": g[300:]}]
    squares = [optim.global_norm(s) ** 2 for s in slices]
    assert optim.global_norm(slices[0], across=lambda _: sum(squares)) == pytest.approx(np.linalg.norm(g), rel=1e-14)


def test_zero_layout_pieces_cover_the_ranks_slices():
    params = {"a": np.zeros((3, 4)), "b": np.zeros(5), "c": np.zeros((2, 2))}
    flat = np.arange(21.0)

    class Rank:
        def __init__(self, rank):
            self.rank, self.size = rank, 3

    seen = []
    for r in range(3):
        layout = distributed.ZeroLayout(params, Rank(r))
        pieces = layout.pieces(flat)
        assert np.array_equal(np.concatenate(list(pieces.values())), flat[layout.lo: layout.hi])
        seen.append(list(pieces))
    assert seen == [["a"], ["a", "b"], ["b", "c"]]


def test_without_mpi4py_asking_for_it_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("NPFLUX_MPI_RANKS", "2")
    with pytest.raises(distributed.DistributedUnavailable, match=r'pip install -e "\.\[mpi\]"'):
        distributed.world()


def test_outside_mpiexec_one_process_and_zero_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    for var in LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert distributed.world() is distributed.LOCAL
    from npflux.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--zero", "1", "--out-dir", str(tmp_path / "out"), "--data", str(tmp_path / "none.txt")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--zero 1" in err and "mpiexec" in err and ".[mpi]" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# under mpiexec
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs are shared between tests: ``runs(name, n, **spec)`` launches once per name."""
    root = tmp_path_factory.mktemp("dist")
    done = {}

    def get(name, n, **spec):
        if name not in done:
            launch(n, root / name, **spec)
            done[name] = result(root / name)
        return done[name]

    get.root = root
    return get


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_n_ranks_train_the_one_process_run_float64(runs, n):
    assert_same_run(runs(f"f64-{n}", n), runs("f64-1", 1), tol=1e-12)


@needs_mpi
def test_n_ranks_train_the_one_process_run_float32(runs):
    spec = dict(dtype="float32", qkv_bias=False)
    one, two = runs("f32-1", 1, **spec), runs("f32-2", 2, **spec)
    assert one[1].dtype == two[1].dtype == np.float32  # float32 stays float32, also through MPI
    assert_same_run(two, one, tol=1e-6)


@needs_mpi
def test_overlapped_buckets_give_the_blocking_all_reduce(runs):
    """Bucketed Iallreduce during the backward (7 or more buckets here) == one Allreduce after it; the untied head
    (a parameter holder without a backward of its own) is covered too."""
    spec = dict(tie_weights=False)
    overlapped = runs("overlap-3", 3, **spec)
    blocking = runs("blocking-3", 3, overlap=False, **spec)
    assert_same_run(overlapped, blocking, tol=1e-12)
    assert_same_run(overlapped, runs("untied-1", 1, **spec), tol=1e-12)


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_zero1_gives_the_plain_run_with_accumulation_clipping_and_schedule(runs, n):
    """ZeRO-1 (reduce-scatter, sharded AdamW, all-gather) == one process, with gradient accumulation,
    clipping (the norm summed over the ranks' slices: the clip must bite, so the max norm is small)
    and a warmup + cosine schedule."""
    spec = dict(grad_accum=2, grad_clip=0.3, lr_schedule="cosine", warmup_iters=4, weight_decay=0.1,
                decay_matrices_only=True)
    assert_same_run(runs(f"zero-{n}", n, zero=1, **spec), runs("accum-1", 1, **spec), tol=1e-12)
    if n == 2:
        assert_same_run(runs("accum-2", 2, **spec), runs("accum-1", 1, **spec), tol=1e-12)


@needs_mpi
@pytest.mark.parametrize("n_after", [1, 3])
def test_resume_a_two_rank_checkpoint_on_other_rank_counts(runs, n_after):
    """Ten steps on 2 ranks (ZeRO-1, so the checkpoint's moments were gathered from slices), then the
    other ten on 1 or 3 ranks: the run one process trains in one go."""
    first = runs.root / f"resume-{n_after}"
    launch(2, first, max_iters=10, zero=1)
    launch(n_after, first, resume=True, resume_step=10, zero=int(n_after > 1))
    assert_same_run(result(first), runs("f64-1", 1), tol=1e-12, first_step=10)


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_job_and_the_last_checkpoint_loads(tmp_path, how):
    """Rank 1 fails at step 7 (an exception, or SIGKILL): the job ends (no hang: the timeout would fail the
    test), with the failing rank's own message for an exception, and the checkpoint of step 5 loads."""
    from npflux.checkpoint import load_checkpoint

    proc = launch(2, tmp_path, timeout=60, check=False, checkpoint_interval=5, fail_rank=1, fail_step=7,
                  fail_how=how)
    assert proc.returncode != 0
    if how == "raise":
        assert "rank 1 of 2 failed: RuntimeError: injected failure at step 7" in proc.stderr
    assert load_checkpoint(tmp_path / "ckpt").step == 5
    launch(1, tmp_path, resume=True, resume_step=5)  # and training goes on from it
    assert len(json.loads((tmp_path / "losses.json").read_text())["losses"]) == 20


def npflux_train(tmp_path, n, *flags):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 60, encoding="utf-8")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "npflux.cli", "train", "--data", str(corpus),
           "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "6",
           "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "2", "--quiet", "--sample-tokens", "0",
           "--out-dir", str(tmp_path / "out"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())


@needs_mpi
def test_mpiexec_npflux_train_end_to_end(tmp_path):
    """The command itself: rank 0 alone prints and writes log.jsonl (one line per evaluation)."""
    proc = npflux_train(tmp_path, 2, "--zero", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("data parallel: 2 ranks") == 1
    lines = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4]
    assert (tmp_path / "out" / "loss.png").is_file()


@needs_mpi
def test_a_diverged_run_on_ranks_says_so_once_and_marks_the_log(tmp_path):
    """Divergence is the same on every rank (the loss is summed over them): not a failure of one rank, no
    abort; rank 0 writes the mark in log.jsonl and gives the one-process message, once."""
    proc = npflux_train(tmp_path, 2, "--learning-rate", "1e30")
    assert proc.returncode == 1
    assert proc.stderr.count("error: training diverged at step") == 1
    assert "MPI_Abort" not in proc.stderr and "failed" not in proc.stderr
    assert "diverged" in (tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1]


@needs_mpi
@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="CuPy or a CUDA GPU not available (the NCCL path runs on GPUs)")
def test_two_ranks_on_the_gpu_through_nccl_train_the_cpu_run(runs):
    """CuPy arrays, gradients all-reduced by NCCL on the GPU(s) (two ranks may share one GPU), against one
    NumPy process: float64 kernels differ between the devices (cuBLAS against OpenBLAS), which adds
    rounding of the same order as the reduction order's, so the float64 bound holds."""
    assert_same_run(runs("gpu-2", 2, backend="cupy"), runs("f64-1", 1), tol=1e-12)
