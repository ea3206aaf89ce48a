"""npflux.models.SparseAutoencoder: numerical gradients, PyTorch with copied weights, the decoder-norm constraint."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npflux.backend import to_numpy
from npflux.gradcheck import check_module
from npflux.models import SAEConfig, SparseAutoencoder

from conftest import dev, host

GRAD_TOL = 1e-7
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)


def rel(a, b):
    a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def make_sae(d, m, tied, l1=0.3, seed=0, dtype="float64"):
    """An SAE with random O(1) weights and biases, and inputs whose pre-activations stay away from the ReLU's kink."""
    rng = np.random.default_rng(seed)
    sae = SparseAutoencoder(SAEConfig(d, m, l1=l1, tied=tied), seed=seed, dtype=dtype)
    for name, p in sae.params.items():
        p[...] = dev((rng.standard_normal(p.shape) / (np.sqrt(d) if p.ndim == 2 else 2)).astype(p.dtype), like=p)
    sae.normalize_decoder()
    for _ in range(50):  # a pre-activation within ~1e-4 of 0 would make the central difference cross the kink
        x = rng.standard_normal((rng.integers(1, 6), d))
        pre = (x - to_numpy(sae.p["b_dec"])) @ to_numpy(sae.p["W_enc"]) + to_numpy(sae.p["b_enc"])
        if np.abs(pre).min() > 1e-3 and (pre > 0).any():
            return sae, dev(x.astype(dtype), like=sae)
    raise AssertionError("no input away from the kink")


class LossOf:
    """The SAE's training loss as a module with a 0-d output, for check_module."""

    def __init__(self, sae):
        self.sae, self.params, self.grads = sae, sae.params, sae.grads

    def zero_grad(self):
        self.sae.zero_grad()

    def forward(self, x):
        self.sae.loss(x)
        err = self.sae.loss_cache[0]
        return (err * err).sum() / len(x) + self.sae.l1 * self.sae.features.sum() / len(x)

    def backward(self, dloss):
        return self.sae.backward_loss(float(dloss))


# --------------------------------------------------------------------------
# numerical gradients, float64, hypothesis shapes
# --------------------------------------------------------------------------
@SETTINGS
@given(d=st.integers(2, 6), mult=st.integers(1, 4), tied=st.booleans(), seed=st.integers(0, 2**31))
def test_gradcheck_forward(d, mult, tied, seed):
    sae, x = make_sae(d, d * mult + 1, tied, seed=seed)
    errors = check_module(sae, {"x": x}, seed=seed)
    assert set(errors) == {"x", *sae.params}
    assert max(errors.values()) <= GRAD_TOL, errors


@SETTINGS
@given(d=st.integers(2, 6), mult=st.integers(1, 4), tied=st.booleans(), l1=st.floats(0.0, 2.0), seed=st.integers(0, 2**31))
def test_gradcheck_loss(d, mult, tied, l1, seed):
    sae, x = make_sae(d, d * mult + 1, tied, l1=l1, seed=seed)
    errors = check_module(LossOf(sae), {"x": x}, seed=seed)
    assert set(errors) == {"x", *sae.params}
    assert max(errors.values()) <= GRAD_TOL, errors


def test_gradcheck_catches_a_wrong_backward(monkeypatch):
    """The check can fail: a backward that forgets b_dec's encoder-side term is caught."""
    sae, x = make_sae(4, 9, tied=False, seed=3)
    original = SparseAutoencoder.backward

    def wrong(self, dx_hat, dfeatures=None):
        g_before = self.g["b_dec"].copy()
        dx = original(self, dx_hat, dfeatures)
        self.g["b_dec"][...] = g_before + dx_hat.sum(axis=0)
        return dx

    monkeypatch.setattr(SparseAutoencoder, "backward", wrong)
    assert check_module(sae, {"x": x})["b_dec"] > 1e-3


# --------------------------------------------------------------------------
# PyTorch with copied weights
# --------------------------------------------------------------------------
class TorchSAE:
    """The same SAE in PyTorch: autograd gives the reference gradients."""

    def __init__(self, torch, sae, dtype):
        self.torch, self.tied, self.l1 = torch, sae.config.tied, sae.l1
        self.p = {k: torch.tensor(to_numpy(v), dtype=dtype, requires_grad=True) for k, v in sae.params.items()}

    def w_dec(self):
        return self.p["W_enc"].T if self.tied else self.p["W_dec"]

    def forward(self, x):
        f = self.torch.relu((x - self.p["b_dec"]) @ self.p["W_enc"] + self.p["b_enc"])
        x_hat = f @ self.w_dec() + self.p["b_dec"]
        loss = ((x_hat - x) ** 2).sum(dim=1).mean() + self.l1 * f.abs().sum(dim=1).mean()
        return x_hat, f, loss

    def constrained_step(self, opt):
        """Project the decoder gradient onto the tangent of the unit sphere, Adam step, renormalise."""
        torch = self.torch
        with torch.no_grad():
            if self.tied:
                w, g = self.p["W_enc"], self.p["W_enc"].grad
                g -= (g * w).sum(dim=0, keepdim=True) * w
            else:
                w, g = self.p["W_dec"], self.p["W_dec"].grad
                g -= (g * w).sum(dim=1, keepdim=True) * w
            opt.step()
            if self.tied:
                w /= w.norm(dim=0, keepdim=True)
            else:
                w /= w.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_matches_torch(torch, tied, dtype, tol):
    sae, _ = make_sae(6, 20, tied, l1=0.2, seed=1, dtype=dtype)
    x = np.random.default_rng(2).standard_normal((13, 6)).astype(dtype)
    tdtype = getattr(torch, dtype)
    ref = TorchSAE(torch, sae, tdtype)
    tx = torch.tensor(x, dtype=tdtype, requires_grad=True)
    t_xhat, t_f, t_loss = ref.forward(tx)
    t_loss.backward()

    loss, recon, l1_term = sae.loss(dev(x, like=sae))
    assert sae.features.dtype == np.dtype(dtype)
    assert (sae.features == 0).mean() > 0.2  # some features are off: the ReLU's backward is exercised
    dx = sae.backward_loss()
    assert dx.dtype == np.dtype(dtype) and all(g.dtype == np.dtype(dtype) for g in sae.grads.values())
    assert rel(sae.features, t_f.detach().numpy()) <= tol
    assert rel(sae.forward(dev(x, like=sae)), t_xhat.detach().numpy()) <= tol
    assert abs(loss - t_loss.item()) <= tol * abs(t_loss.item())
    assert abs(recon + 0.2 * l1_term - loss) <= 1e-12 * abs(loss)
    assert rel(dx, tx.grad.numpy()) <= tol
    for name, g in sae.grads.items():
        assert rel(g, ref.p[name].grad.numpy()) <= tol, name


@pytest.mark.parametrize("tied", [False, True])
def test_training_steps_match_torch_adam(torch, tied):
    """Five constrained steps (projected gradient, Adam, renormalised decoder) as in PyTorch, float64."""
    from npflux.optim import AdamW

    sae, _ = make_sae(5, 12, tied, l1=0.1, seed=4)
    ref = TorchSAE(torch, sae, torch.float64)
    topt = torch.optim.Adam(list(ref.p.values()), lr=1e-2)
    opt = AdamW(sae.params, lr=1e-2, weight_decay=0.0)
    rng = np.random.default_rng(5)
    for _ in range(5):
        x = rng.standard_normal((16, 5))
        topt.zero_grad()
        ref.forward(torch.tensor(x))[2].backward()
        ref.constrained_step(topt)
        sae.zero_grad()
        sae.loss(dev(x, like=sae))
        sae.backward_loss()
        sae.project_decoder_grad()
        opt.step(sae.grads)
        sae.normalize_decoder()
    for name, p in sae.params.items():
        assert rel(p, ref.p[name].detach().numpy()) <= 1e-10, name


# --------------------------------------------------------------------------
# the constraint, dtypes, errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_decoder_constraint(tied):
    sae, x = make_sae(4, 10, tied, seed=6)
    rows = lambda: to_numpy(sae.W_dec)  # noqa: E731
    np.testing.assert_allclose(np.linalg.norm(rows(), axis=1), 1.0, rtol=1e-12)
    sae.loss(x)
    sae.backward_loss()
    key = "W_enc" if tied else "W_dec"
    grad_rows = lambda: to_numpy(sae.g[key].T if tied else sae.g[key])  # noqa: E731
    radial = (grad_rows() * rows()).sum(axis=1)
    assert np.abs(radial).max() > 1e-6  # there is something to remove
    tangent_before = grad_rows() - radial[:, None] * rows()
    sae.project_decoder_grad()
    assert np.abs((grad_rows() * rows()).sum(axis=1)).max() <= 1e-12
    np.testing.assert_allclose(grad_rows(), tangent_before, atol=1e-12)
    sae.p[key][...] *= 3.0
    sae.normalize_decoder()
    np.testing.assert_allclose(np.linalg.norm(rows(), axis=1), 1.0, rtol=1e-12)


def test_init_and_dtype():
    sae = SparseAutoencoder(d_in=8, n_features=32, l1=0.1)
    assert {k: v.shape for k, v in sae.params.items()} == {"W_enc": (8, 32), "b_enc": (32,), "W_dec": (32, 8), "b_dec": (8,)}
    assert all(v.dtype == np.float32 for v in sae.params.values())
    np.testing.assert_allclose(np.linalg.norm(host(sae.p["W_dec"]), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(host(sae.p["W_enc"]), host(sae.p["W_dec"].T))
    x = dev(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32), like=sae)
    assert sae.forward(x).dtype == np.float32 and sae.encode(x).dtype == np.float32
    tied = SparseAutoencoder(SAEConfig(8, 32, tied=True))
    assert set(tied.params) == {"W_enc", "b_enc", "b_dec"}


def test_errors():
    sae = SparseAutoencoder(d_in=4, n_features=8)
    with pytest.raises(ValueError, match="width 5"):
        sae.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="floating"):
        sae.forward(np.zeros((2, 4), np.int64))
    with pytest.raises(RuntimeError, match="forward first"):
        SparseAutoencoder(d_in=4, n_features=8).backward(np.zeros((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="loss"):
        sae.backward_loss()
    # a forward of another batch between loss and backward_loss: its caches are not the loss's
    sae.loss(dev(np.ones((2, 4), np.float32), like=sae))
    sae.forward(dev(np.zeros((2, 4), np.float32), like=sae))
    with pytest.raises(RuntimeError, match="loss"):
        sae.backward_loss()
    with pytest.raises(ValueError, match="l1"):
        SAEConfig(4, 8, l1=-1.0)
    with pytest.raises(ValueError, match="positive"):
        SAEConfig(0, 8)
