"""A sparse autoencoder (SAE) over model activations, forward and backward by hand.

    x (N, d) -> f = relu((x - b_dec) @ W_enc + b_enc)   (N, m), m > d: overcomplete, mostly zeros
             -> x_hat = f @ W_dec + b_dec               (N, d)

    loss = (1/N) sum_n ||x_n - x_hat_n||^2  +  l1 * (1/N) sum_n sum_j f_nj

(f >= 0 after the ReLU, so sum_j f_nj is the L1 norm of the codes.) The
layout is the one SAE libraries (SAELens) store: W_enc (d, m), b_enc (m),
W_dec (m, d), b_dec (d); row j of W_dec is feature j's direction in the
activation space (a column of the d x m matrix of the math). ``tied=True``
uses W_enc.T as the decoder and has no W_dec.

Why the decoder rows must have unit norm: otherwise the L1 penalty is
dodged for free by shrinking f and growing the rows of W_dec by the same
factor. The constraint is kept explicitly, in two steps of every update
(``npflux.interp.train_sae`` does both):

1. ``project_decoder_grad()``: remove from each row's gradient its component
   along the row, g_j <- g_j - (g_j . w_j) w_j. On the unit sphere only the
   tangent component can change the loss; the radial one would only be
   undone by the renormalisation, and, through Adam's moments, would bias
   the other coordinates.
2. ``normalize_decoder()`` after the optimizer step: w_j <- w_j / ||w_j||
   (Adam's per-coordinate scaling does not keep a tangent step on the
   sphere, so a small radial drift is removed).

Backward, with pre = xc @ W_enc + b_enc and xc = x - b_dec:

    dW_dec = f.T @ dx_hat            db_dec = sum_n dx_hat_n - sum_n dxc_n
    df     = dx_hat @ W_dec.T (+ the L1 term l1/N)
    dpre   = df * [pre > 0]          (ReLU)
    dW_enc = xc.T @ dpre             db_enc = sum_n dpre_n
    dxc    = dpre @ W_enc.T          dx = dxc (+ the loss's direct term -2 (x_hat - x)/N)

(tied: W_enc receives both dW_enc and dW_dec.T). b_dec appears twice: it is
subtracted before encoding and added after decoding, so its gradient is the
decoder's bias gradient minus the encoder input's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import ops
from ..backend import check_float, get_backend
from ..nn import Module


@dataclass
class SAEConfig:
    d_in: int                 # width of the activations (the model's n_embd for the residual stream)
    n_features: int           # m, the dictionary size (overcomplete: several times d_in)
    l1: float = 1e-3          # the sparsity coefficient
    tied: bool = False        # decoder = encoder transposed

    def __post_init__(self):
        if int(self.d_in) <= 0 or int(self.n_features) <= 0:
            raise ValueError(f"SAEConfig: d_in and n_features must be positive, got {self.d_in}, {self.n_features}")
        if self.l1 < 0:
            raise ValueError(f"SAEConfig: l1 must be >= 0, got {self.l1}")

    def to_dict(self) -> dict:
        return asdict(self)


class SparseAutoencoder(Module):
    """d -> m ReLU features -> d, with unit-norm decoder rows (see the module docstring).

    ``SparseAutoencoder(SAEConfig(d_in, n_features, l1, tied), seed=0)`` or
    ``SparseAutoencoder(d_in=.., n_features=.., ...)``. Decoder rows start as
    random unit vectors and the encoder as their transpose (each feature
    first reads along the direction it writes); biases start at zero
    (``npflux.interp.train_sae`` sets b_dec to the data's mean).
    """

    def __init__(self, config: SAEConfig = None, seed: int = 0, backend=None, dtype=None, **kwargs):
        super().__init__(backend, dtype)
        if config is None:
            config = SAEConfig(**kwargs)
        elif kwargs:
            raise TypeError("SparseAutoencoder: pass a config or keyword fields, not both")
        self.config = c = config
        rng = get_backend("numpy").rng(seed)
        directions = rng.standard_normal((c.n_features, c.d_in))
        directions /= (directions ** 2).sum(axis=1, keepdims=True) ** 0.5
        self.add_param("W_enc", directions.T.copy())
        self.add_param("b_enc", self.xp.zeros(c.n_features))
        if not c.tied:
            self.add_param("W_dec", directions)
        self.add_param("b_dec", self.xp.zeros(c.d_in))
        self.cache = self.loss_cache = None
        self.features = None

    @property
    def l1(self):
        return self.config.l1

    @property
    def W_dec(self):
        """The (m, d) decoder: feature directions as rows (a view of W_enc.T when tied)."""
        return self.p["W_enc"].T if self.config.tied else self.p["W_dec"]

    # -- forward and backward -----------------------------------------------------------
    def encode(self, x):
        """f = relu((x - b_dec) @ W_enc + b_enc), the feature activations (no cache kept)."""
        f, _ = self._encode(x)
        return f

    def _encode(self, x):
        check_float(x, "SparseAutoencoder: x")
        if x.shape[-1] != self.config.d_in:
            raise ValueError(f"SparseAutoencoder: x has width {x.shape[-1]}, the SAE reads {self.config.d_in}")
        xc = x - self.p["b_dec"]
        pre, enc_cache = ops.linear_forward(xc, self.p["W_enc"], self.p["b_enc"])
        f, relu_cache = ops.relu_forward(pre, out=pre)  # pre is ours: ReLU in place
        return f, (enc_cache, relu_cache)

    def decode(self, f):
        """x_hat = f @ W_dec + b_dec."""
        x_hat, _ = ops.linear_forward(f, self.W_dec, self.p["b_dec"])
        return x_hat

    def forward(self, x):
        """x_hat (..., d); keeps the features in ``self.features`` and what backward needs."""
        self.loss_cache = None  # a loss of an earlier batch no longer matches the caches kept here
        f, enc = self._encode(x)
        x_hat, dec_cache = ops.linear_forward(f, self.W_dec, self.p["b_dec"])
        self.cache = (enc, dec_cache)
        self.features = f
        return x_hat

    def backward(self, dx_hat, dfeatures=None):
        """dx from d(x_hat) (and optionally a gradient on the features); ADDS the parameter gradients."""
        if self.cache is None:
            raise RuntimeError("SparseAutoencoder.backward: call forward first")
        (enc_cache, relu_cache), dec_cache = self.cache
        df, dW_dec, db_dec = ops.linear_backward(dx_hat, dec_cache)
        if dfeatures is not None:
            df += dfeatures
        dpre = ops.relu_backward(df, relu_cache, out=df)
        dxc, dW_enc, db_enc = ops.linear_backward(dpre, enc_cache)
        g = self.g
        g["W_enc"] += dW_enc
        if self.config.tied:
            g["W_enc"] += dW_dec.T
        else:
            g["W_dec"] += dW_dec
        g["b_enc"] += db_enc
        g["b_dec"] += db_dec - dxc.reshape(-1, dxc.shape[-1]).sum(axis=0)
        return dxc

    # -- the training loss -------------------------------------------------------------
    def loss(self, x, l1=None):
        """(loss, reconstruction, l1_term) of a batch x (N, d); keeps what ``backward_loss`` needs.

        reconstruction = mean over rows of ||x - x_hat||^2; l1_term = mean over
        rows of sum_j f_j; loss = reconstruction + l1 * l1_term (Python floats).
        ``l1`` overrides the config's coefficient for this call (a warm-up schedule).
        """
        l1 = self.l1 if l1 is None else float(l1)
        if x.ndim != 2:
            raise ValueError(f"SparseAutoencoder.loss: x must be (N, d), got shape {x.shape}")
        x_hat = self.forward(x)
        err = x_hat - x
        N = x.shape[0]
        reconstruction = float((err * err).sum()) / N
        l1_term = float(self.features.sum()) / N
        self.loss_cache = (err, N, l1)
        return reconstruction + l1 * l1_term, reconstruction, l1_term

    def backward_loss(self, loss_scale=1.0):
        """Gradients of ``loss_scale * loss`` of the last ``loss`` call, ADDED into ``grads``; returns dx.

        d/dx_hat = 2 (x_hat - x) / N;  d/df = l1 / N (the ReLU's backward keeps it where f > 0);
        x also enters the loss directly: dx gets -2 (x_hat - x) / N besides the path through the SAE.
        """
        if self.loss_cache is None:
            raise RuntimeError("SparseAutoencoder.backward_loss: call loss(x) first")
        err, N, l1 = self.loss_cache
        dx_hat = err * (2.0 * loss_scale / N)
        dfeatures = self.xp.full_like(self.features, l1 * loss_scale / N)
        dx = self.backward(dx_hat, dfeatures)
        self.loss_cache = None
        return dx - dx_hat

    # -- the unit-norm constraint on the decoder ------------------------------------------
    def project_decoder_grad(self):
        """Remove from each decoder row's gradient its component along the row: g_j -= (g_j . w_j) w_j.

        Call after backward, before the optimizer step. Tied: the rows are
        W_enc's columns, and the projection acts on W_enc's whole gradient.
        """
        if self.config.tied:
            w, g = self.p["W_enc"], self.g["W_enc"]
            g -= (g * w).sum(axis=0, keepdims=True) * w
        else:
            w, g = self.p["W_dec"], self.g["W_dec"]
            g -= (g * w).sum(axis=1, keepdims=True) * w

    def normalize_decoder(self):
        """Scale every decoder row to unit norm (after each optimizer step)."""
        if self.config.tied:
            w = self.p["W_enc"]
            w /= self.xp.sqrt((w * w).sum(axis=0, keepdims=True))
        else:
            w = self.p["W_dec"]
            w /= self.xp.sqrt((w * w).sum(axis=1, keepdims=True))
