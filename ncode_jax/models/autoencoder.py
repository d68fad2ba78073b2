"""Autoencoders of the paper's section 5.3: AutoN-CODE, a vanilla AE and a VAE on the same coders.

All three share one encoder/decoder pair (:mod:`~ncode_jax.models.coders`, table A.1) and
differ only in how the encoder output becomes the latent code ``z`` of size ``n``:

* ``"ncode"`` — **AutoN-CODE**. The encoder outputs the controls θ, ``2n`` entries (after the
  component-wise normalisation), of the linear system ``dx/dt = A(θ) x`` whose matrix has a fixed
  sparse pattern, two non-zeros per row (:class:`~ncode_jax.fields.SparseLinearField`,
  ``A[i, i] = θ[i, 0]``, ``A[i, (i+1) mod n] = θ[i, 1]``). From the constant ``x(0) = (1, …, 1)``
  the flow is solved on ``[0, t1]`` (``t1 = 10``) with :func:`~ncode_jax.solve`, and
  ``z = x(t1) = expm(t1·A(θ)) x(0)`` is decoded. The orbit ``x(t)`` can be decoded at any ``ts``.
* ``"vae"`` — the encoder outputs ``2n`` entries, mean and log-variance of ``q(z|x)``; ``z`` is
  drawn by reparameterisation while training and is the mean at evaluation; prior N(0, I).
* ``"ae"`` — the encoder outputs ``n`` entries, read directly as ``z``.

``latent_norm=True`` (any kind; **not in the paper**) puts a component-wise batch normalisation
(:class:`~ncode_jax.models.coders.ComponentNorm`, learned scale and shift) in front of the decoder,
so the decoder sees ``BN(z)``; ``z`` itself (what :meth:`Autoencoder.latent` returns and the
samplers fit) is unchanged. AutoN-CODE's codes ``x(t1)`` otherwise reach the decoder
unnormalised (on ``mnist5k``: mean ≈ 3, std ≈ 2, nearly all positive), while the AE's code is the
output of the encoder's final normalisation; see ``docs/experiments.md`` for what it changes.

AutoN-CODE and the VAE therefore have exactly the same parameters (the constant ``x(0)`` is not
learned); the AE's last encoder layer is ``n`` outputs smaller.

Likelihoods (the losses of sec. 5.3): ``"bernoulli"`` — the decoder outputs logits and the
reconstruction term is the binary cross-entropy summed over pixels (the Kullback–Leibler
divergence between data and decoder distributions up to the data's constant entropy; MNIST);
``"mse"`` — the decoder outputs pixel values and the term is the squared error summed over pixels
(CIFAR-10, CelebA). The VAE adds ``KL(q(z|x) ‖ N(0, I))``. The loss is averaged over the batch.

Variables are a plain dict ``{"params": {"encoder", "decoder"}, "batch_stats": {"encoder",
"decoder"}}`` (batch-norm running averages live in ``batch_stats``). Every method is a pure
function of ``variables``; only :meth:`Autoencoder.apply` with ``train=True`` returns updated
batch statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from ..dynamics import Dynamics
from ..fields import SparseLinearField
from ..regularizers import regularizer_args
from ..solve import Solution, solve
from ..solving.options import SOLVE_CONFIG_FIELDS, SolveConfig
from .coders import Architecture, ComponentNorm

MODEL_KINDS = ("ae", "vae", "ncode")
LIKELIHOODS = ("bernoulli", "mse")
MODEL_LABELS = {"ae": "AE", "vae": "VAE", "ncode": "AutoN-CODE"}


class NormalizedDecoder(nn.Module):
    """``decoder(BN(z))``: a :class:`~ncode_jax.models.coders.ComponentNorm` of the ``(B, n)`` code
    (batch statistics while training, running averages at evaluation), then ``decoder``."""

    decoder: nn.Module

    @nn.compact
    def __call__(self, z: Array, train: bool) -> Array:
        return self.decoder(ComponentNorm()(z, train), train)


class Output(NamedTuple):
    """One forward pass: ``recon`` ``(B, h, w, c)`` decoder output (logits for ``bernoulli``),
    ``z`` ``(B, n)`` latent code, ``enc`` ``(B, k)`` encoder output (θ, [mean, log-variance] or
    ``z``), ``solution`` the latent flow's :class:`~ncode_jax.solve.Solution` (AutoN-CODE only)."""

    recon: Array
    z: Array
    enc: Array
    solution: Solution | None


@dataclass(frozen=True)
class Autoencoder:
    """An ``ae``, ``vae`` or ``ncode`` autoencoder for images of ``image_shape = (h, w, c)``.

    ``solve`` holds the solver settings of the AutoN-CODE latent flow (a
    :class:`~ncode_jax.SolveConfig`; the flow starts at ``t0 = 0`` and runs to ``solve.t1``, 10
    by default); ``offsets`` its sparse pattern (``(0, 1)``: two non-zeros per row);
    ``control_scale`` the initial scale of the controls' normalisation (small, so that
    ``t1·A(θ)`` starts with entries of order one); ``latent_norm`` a batch normalisation of the
    code at the decoder's input (not in the paper, see the module docstring).

    Raises:
      ValueError: an unknown kind or likelihood, an image shape the architecture cannot take, a
        running cost without a latent flow, ``solve.t0 != 0``, ``t1 <= 0`` or ``control_scale <= 0``.
    """

    kind: str
    arch: Architecture
    image_shape: tuple[int, int, int]
    likelihood: str = "bernoulli"
    solve: SolveConfig = SolveConfig(t1=10.0)
    offsets: tuple[int, ...] = (0, 1)
    control_scale: float = 0.1
    latent_norm: bool = False
    running_cost: Any = None  # AutoN-CODE only: a running cost ℓ on the latent flow (regularizers)

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown autoencoder {self.kind!r}; choose one of {list(MODEL_KINDS)}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; choose one of {list(LIKELIHOODS)}")
        self.arch.check_image_shape(tuple(self.image_shape))
        if self.running_cost is not None and self.kind != "ncode":
            raise ValueError(f"a running cost (flow regulariser) needs a latent flow; the "
                             f"{MODEL_LABELS[self.kind]} has none: set kinetic=0 and jacobian=0")
        if not isinstance(self.solve, SolveConfig):
            raise TypeError(f"solve must be a SolveConfig, got {type(self.solve).__name__}")
        if self.kind == "ncode" and self.solve.t0 != 0:
            raise ValueError(f"t0={self.solve.t0}: the AutoN-CODE latent flow starts at t0 = 0")
        if not self.t1 > 0 or not self.control_scale > 0:
            raise ValueError(f"need t1 > 0 and control_scale > 0, got {self.t1}, {self.control_scale}")

    @property
    def t1(self) -> float:
        """The end of the latent flow's interval ``[0, t1]``."""
        return self.solve.t1

    @property
    def solve_options(self) -> dict:
        """The latent flow's solver settings but ``t0`` (which is 0), as keyword arguments."""
        return {k: v for k, v in self.solve.kwargs().items() if k != "t0"}

    # ------------------------------------------------------------------ structure

    @property
    def latent_dim(self) -> int:
        return self.arch.latent_dim

    @property
    def field(self) -> SparseLinearField:
        """The latent field ``A(θ) x`` (AutoN-CODE)."""
        return SparseLinearField(self.latent_dim, tuple(self.offsets))

    @property
    def enc_dim(self) -> int:
        """Size of the encoder output: θ (``n·len(offsets)``), mean+log-variance (``2n``) or ``n``."""
        if self.kind == "ncode":
            return self.field.num_params
        return 2 * self.latent_dim if self.kind == "vae" else self.latent_dim

    @property
    def encoder(self):
        scale = self.control_scale if self.kind == "ncode" else 1.0
        return self.arch.encoder(self.enc_dim, scale)

    @property
    def decoder(self):
        inner = self.arch.decoder(tuple(self.image_shape))
        return NormalizedDecoder(inner) if self.latent_norm else inner

    @property
    def x0(self) -> Float[Array, " n"]:
        """The constant initial state of the latent flow, ``(1, …, 1)``."""
        return jnp.ones((self.latent_dim,))

    def init(self, key: PRNGKeyArray) -> dict:
        """Variables ``{"params": {...}, "batch_stats": {...}}`` (float32)."""
        k_enc, k_dec = jax.random.split(key)
        images = jnp.zeros((1, *self.image_shape), jnp.float32)
        enc = self.encoder.init(k_enc, images, train=False)
        dec = self.decoder.init(k_dec, jnp.zeros((1, self.latent_dim), jnp.float32), train=False)
        return {"params": {"encoder": enc["params"], "decoder": dec["params"]},
                "batch_stats": {"encoder": enc.get("batch_stats", {}),
                                "decoder": dec.get("batch_stats", {})}}

    def num_params(self, variables: dict | None = None) -> int:
        """Number of trained parameters (batch statistics excluded)."""
        if variables is None:
            variables = jax.eval_shape(self.init, jax.random.key(0))
        return int(sum(math.prod(a.shape) for a in jax.tree.leaves(variables["params"])))

    def check_variables(self, variables: dict, who: str = "variables") -> None:
        """Raise a ValueError naming the first array whose shape does not fit this model (e.g. a
        checkpoint trained with another latent size)."""
        expected = jax.eval_shape(self.init, jax.random.key(0))
        flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
        flat_v = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
        if set(flat_e) != set(flat_v):
            missing = sorted(map(jax.tree_util.keystr, set(flat_e) - set(flat_v)))
            extra = sorted(map(jax.tree_util.keystr, set(flat_v) - set(flat_e)))
            raise ValueError(f"{who} do not fit this {self.describe()}: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for path, e in flat_e.items():
            v = flat_v[path]
            if tuple(np.shape(v)) != tuple(e.shape):
                raise ValueError(
                    f"{who} do not fit this {self.describe()}: {jax.tree_util.keystr(path)} has "
                    f"shape {tuple(np.shape(v))}, the model needs {tuple(e.shape)} (were they "
                    f"trained with another latent size, architecture or image shape?)")

    def describe(self) -> str:
        return (f"{MODEL_LABELS[self.kind]} ({self.arch.kind} coders, widths {self.arch.widths}, "
                f"latent size {self.latent_dim}, images {tuple(self.image_shape)})")

    def check_images(self, images: Array) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"images have shape {tuple(images.shape)}, but this {self.describe()} "
                             f"needs (batch, {', '.join(map(str, self.image_shape))})")

    # ------------------------------------------------------------------ pieces

    def _encode(self, variables, images, train: bool):
        v = {"params": variables["params"]["encoder"], "batch_stats": variables["batch_stats"]["encoder"]}
        if train:
            out, upd = self.encoder.apply(v, images, train=True, mutable=["batch_stats"])
            return out, upd["batch_stats"]
        return self.encoder.apply(v, images, train=False), v["batch_stats"]

    def _decode(self, variables, z, train: bool):
        stats = variables["batch_stats"]["decoder"]
        v = {"params": variables["params"]["decoder"], **({"batch_stats": stats} if stats else {})}
        if train and stats:
            out, upd = self.decoder.apply(v, z, train=True, mutable=["batch_stats"])
            return out, upd["batch_stats"]
        return self.decoder.apply(v, z, train=train), stats

    def flow(self, theta: Float[Array, "B P"], ts: Array | None = None, cost_args=None) -> Solution:
        """Solve ``dx/dt = A(θ) x`` from ``x(0) = 1`` on ``[0, t1]``; ``x`` is ``(B, n)`` at
        ``t1`` or ``(len(ts), B, n)`` at ``ts``; ``sol.cost`` is ``∫ ℓ dt`` of ``running_cost``."""
        x0 = jnp.broadcast_to(self.x0.astype(theta.dtype), (theta.shape[0], self.latent_dim))
        return solve(Dynamics(self.field, running_cost=self.running_cost), x0, theta, cost_args=cost_args,
                     ts=ts, config=self.solve)

    def _latent(self, enc, *, key=None, ts=None):
        n = self.latent_dim
        if self.kind == "ncode":
            sol = self.flow(enc, ts, regularizer_args(self.running_cost, key))
            return sol.x, sol
        if self.kind == "vae":
            mean, logvar = enc[:, :n], enc[:, n:]
            if key is None:
                return mean, None
            return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype), None
        return enc, None

    def output_images(self, recon: Array) -> Array:
        """Decoder output → images: ``sigmoid`` of logits (``bernoulli``) or the values clipped
        to ``[0, 1]`` (``mse``)."""
        return jax.nn.sigmoid(recon) if self.likelihood == "bernoulli" else jnp.clip(recon, 0.0, 1.0)

    # ------------------------------------------------------------------ public API

    def apply(self, variables: dict, images: Array, *, train: bool = False,
              key: PRNGKeyArray | None = None) -> tuple[Output, dict]:
        """Encode, (sample / flow) and decode a batch; returns the :class:`Output` and the batch
        statistics (updated when ``train``). The VAE samples ``z`` only when ``key`` is given."""
        self.check_images(images)
        enc, enc_stats = self._encode(variables, images, train)
        z, sol = self._latent(enc, key=key)
        recon, dec_stats = self._decode(variables, z, train)
        return Output(recon, z, enc, sol), {"encoder": enc_stats, "decoder": dec_stats}

    def encode(self, variables: dict, images: Array) -> Array:
        """Encoder output (evaluation mode): θ, [mean, log-variance] or the code."""
        self.check_images(images)
        return self._encode(variables, images, False)[0]

    def latent(self, variables: dict, images: Array) -> Float[Array, "B n"]:
        """Latent codes (evaluation mode): ``x(t1)``, the posterior mean, or the code."""
        return self._latent(self.encode(variables, images))[0]

    def decode(self, variables: dict, z: Float[Array, "B n"]) -> Array:
        """Images in ``[0, 1]`` from latent codes ``(B, n)``."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latent codes have shape {tuple(z.shape)}, but this {self.describe()} "
                             f"needs (batch, {self.latent_dim})")
        return self.output_images(self._decode(variables, z, False)[0])

    def controls_to_latent(self, theta: Float[Array, "B P"]) -> Float[Array, "B n"]:
        """AutoN-CODE only: the code ``x(t1)`` of controls θ ``(B, P)`` (``P = enc_dim``), the flow
        without the encoder — for generation by sampling in the space of the controls (the paper's
        sec. 5.4 names it as future work). Raises ValueError for another kind or another ``P``."""
        if self.kind != "ncode":
            raise ValueError(f"only AutoN-CODE has controls; this is a {MODEL_LABELS[self.kind]}")
        if theta.ndim != 2 or theta.shape[1] != self.enc_dim:
            raise ValueError(f"controls have shape {tuple(theta.shape)}, but this {self.describe()} needs "
                             f"(batch, {self.enc_dim})")
        return self.flow(theta).x

    def reconstruct(self, variables: dict, images: Array) -> Array:
        """``decode(latent(images))`` in ``[0, 1]``."""
        return self.decode(variables, self.latent(variables, images))

    def orbit(self, variables: dict, images: Array, ts: Array) -> tuple[Array, Array]:
        """AutoN-CODE only: the latent orbit ``x(ts)`` ``(T, B, n)`` and its decoded images
        ``(T, B, h, w, c)`` (figs. 8 and A.2)."""
        if self.kind != "ncode":
            raise ValueError(f"only AutoN-CODE has a latent orbit; this is a {MODEL_LABELS[self.kind]}")
        xs = self._latent(self.encode(variables, images), ts=jnp.asarray(ts))[0]
        decoded = jax.vmap(lambda z: self.decode(variables, z))(xs)
        return xs, decoded

    def loss(self, variables: dict, images: Array, *, train: bool = True,
             key: PRNGKeyArray | None = None) -> tuple[Array, tuple[dict, dict]]:
        """Batch-mean loss (reconstruction term + the VAE's KL) and ``(metrics, batch_stats)``;
        metrics hold ``recon``, ``kl`` and ``mse`` (pixel mean squared error of the images in
        ``[0, 1]``). The VAE needs ``key`` while training."""
        if self.kind == "vae" and train and key is None:
            raise ValueError("the VAE samples z while training: pass key=...")
        out, stats = self.apply(variables, images, train=train, key=key if train else None)
        if self.likelihood == "bernoulli":
            rec = optax.sigmoid_binary_cross_entropy(out.recon, images)
        else:
            rec = (out.recon - images) ** 2
        rec = rec.reshape(rec.shape[0], -1).sum(-1)
        kl = jnp.zeros_like(rec)
        if self.kind == "vae":
            n = self.latent_dim
            mean, logvar = out.enc[:, :n], out.enc[:, n:]
            kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1)
        mse = jnp.mean((self.output_images(out.recon) - images) ** 2)
        metrics = {"recon": rec.mean(), "kl": kl.mean(), "mse": mse}
        loss = jnp.mean(rec + kl)
        if out.solution is not None:
            metrics["nfe"] = out.solution.stats["nfe"]
        if self.running_cost is not None:  # the flow regularisers (probes drawn from key)
            metrics["reg"] = jnp.mean(out.solution.cost)
            loss = loss + metrics["reg"]
        return loss, (metrics, stats)


def autoencoder(kind: str, arch: Architecture, image_shape: tuple[int, int, int], *,
                solve: SolveConfig | None = None, **options) -> Autoencoder:
    """Build an :class:`Autoencoder`. ``options``: the model's (likelihood, offsets,
    control_scale, latent_norm, running_cost) and, instead of ``solve``, the latent flow's solver
    settings as :class:`~ncode_jax.SolveConfig` fields (t1, solver, dt, rtol, atol, adjoint,
    max_steps, checkpoints, seminorm, batch), which build one (``t1`` 10 unless given).

    Raises:
      TypeError: both ``solve`` and solver settings given; and what :class:`Autoencoder` and
        :class:`~ncode_jax.SolveConfig` raise.
    """
    settings = {k: options.pop(k) for k in SOLVE_CONFIG_FIELDS if k in options}
    if settings and solve is not None:
        raise TypeError(f"autoencoder: pass solve=SolveConfig(...) or solver settings {sorted(settings)}, "
                        "not both")
    if solve is None:
        solve = SolveConfig(**{"t1": 10.0, **settings})
    return Autoencoder(kind, arch, tuple(int(s) for s in image_shape), solve=solve, **options)
