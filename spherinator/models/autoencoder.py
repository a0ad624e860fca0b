"""LightningModules: the deterministic Autoencoder and the Power Spherical VariationalAutoencoder."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributions import kl_divergence

from spherinator.distributions import HypersphericalUniform, PowerSpherical
from spherinator.errors import ConfigError, NonFiniteLossError  # noqa: F401 (re-exported)
from spherinator.models._api import no_unpacking
from spherinator.models._shapes import dry_forward, param_device_dtype
from spherinator.models.transfer import drop_weight_sources
from spherinator.models.variational_encoder import VariationalEncoder

_TERMS = {"loss": "reconstruction loss", "recon": "reconstruction loss", "kl": "KL term"}


@contextmanager
def _modules_in_hparams_allowed() -> Iterator[None]:
    # Plain save_hyperparameters(): under LightningCLI it stores the class_path config, from Python the modules
    # themselves; both let load_from_checkpoint / fit --ckpt_path rebuild the model (ignore=[...] breaks both).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is an instance of `nn.Module` and is already saved.*")
        yield


def _as_loss(loss: nn.Module | type[nn.Module]) -> nn.Module:
    module = loss() if isinstance(loss, type) else loss
    if not isinstance(module, nn.Module):
        raise TypeError(f"reconstruction_loss must be an nn.Module or its class (e.g. torch.nn.MSELoss), got {loss!r}")
    return module


def model_input(batch: Any) -> torch.Tensor:
    """The model input of a batch: the tensor itself, the first entry of a dict, or the first of a tuple."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return next(iter(batch.values()))
    if isinstance(batch, list | tuple):
        return batch[0]
    raise TypeError(f"batch must be a tensor, a dict of tensors or a tuple, got {type(batch).__name__}")


def _is_strings(column: Any) -> bool:
    """A per-row string column of a batch (object names): a list of ``str``."""
    return isinstance(column, list) and all(isinstance(v, str) for v in column)


def fix_concentration(scale_head: nn.Linear, fixed_scale: float) -> None:
    """Make ``scale_head`` output ``fixed_scale`` whatever its input: zero, frozen weights and a frozen bias."""
    if not math.isfinite(fixed_scale):
        raise ConfigError(
            f"fixed_scale must be a finite number (the concentration is softplus(fixed_scale) + 1), got "
            f"{fixed_scale}; or null to learn it"
        )
    with torch.no_grad():
        scale_head.weight.zero_()
        scale_head.bias.fill_(float(fixed_scale))
    scale_head.requires_grad_(False)


class _AutoencoderBase(pl.LightningModule):
    """Shared batch handling, shape wiring, steps and default optimiser of the two autoencoders."""

    encoder: nn.Module
    decoder: nn.Module
    reconstruction_loss: nn.Module
    input_dim: tuple[int, ...] | None
    z_dim: int

    def _wire_shapes(self, latent_dim: int | None) -> None:
        """Give the decoder the latent size and the sample shape it may lack, then materialise lazy layers."""
        decoder = self.decoder
        decoder_in = getattr(decoder, "input_dim", None)
        if latent_dim is not None:
            if hasattr(decoder, "set_input_dim"):
                decoder.set_input_dim(latent_dim)  # raises naming both values on a mismatch
            elif decoder_in is not None and decoder_in != latent_dim:
                raise ValueError(
                    f"decoder input_dim {decoder_in} disagrees with the latent size {latent_dim} (z_dim); make them "
                    "equal or leave the decoder's input_dim out"
                )
        if self.input_dim is None:
            return  # lazy layers materialise at the first batch
        decoder_out = getattr(decoder, "output_dim", None)
        if decoder_out is not None and tuple(decoder_out) != self.input_dim:
            raise ValueError(
                f"decoder output_dim {list(decoder_out)} disagrees with the encoder input_dim {list(self.input_dim)}; "
                "the decoder must reconstruct the input shape (leave the decoder's output_dim out to follow it)"
            )
        if decoder_out is None and hasattr(decoder, "set_output_dim"):
            decoder.set_output_dim(self.input_dim)
        device, dtype = param_device_dtype(self)
        x_hat = dry_forward(self, self.forward, torch.zeros(1, *self.input_dim, device=device, dtype=dtype))
        self._check_reconstruction_shape(tuple(x_hat.shape[1:]), self.input_dim)

    @staticmethod
    def _check_reconstruction_shape(produced: tuple[int, ...], expected: tuple[int, ...]) -> None:
        if produced != expected:
            raise ValueError(
                f"the decoder produces samples of shape {list(produced)} but the input has shape {list(expected)}; "
                "change the decoder so that it reconstructs the input shape"
            )

    @contextmanager
    def _batchnorm_single_sample(self, batch_size: int) -> Iterator[None]:
        """For a training batch of one sample, let BatchNorm use its running statistics.

        Batch statistics of one sample are meaningless and fail outright for 1x1 feature maps ("Expected more
        than 1 value per channel"); this happens with a last partial batch of size 1.
        """
        norms = []
        if batch_size == 1 and self.training:
            norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.eval()
        try:
            yield
        finally:
            for m in norms:
                m.train()

    def _remember_input_dim(self, x: torch.Tensor) -> None:
        if self.input_dim is None:
            self.input_dim = tuple(x.shape[1:])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        return self._shared_step(batch, "test")

    def _log_losses(self, stage: str, batch_size: int, **losses: torch.Tensor) -> None:
        for suffix, value in losses.items():
            name = f"{stage}_{suffix}" if suffix != "loss" else f"{stage}_loss"
            self.log(name, value, batch_size=batch_size, prog_bar=suffix == "loss", sync_dist=stage != "train")
        self._check_finite(stage, {k: v for k, v in losses.items() if k != "loss"} or losses)  # the terms

    def _log_upstream_names(self, stage: str, batch_size: int, **values: torch.Tensor) -> None:
        """The names upstream Spherinator logs, beside ours, for its ``monitor:`` keys and dashboards.

        ``values``: ``loss_recon`` (= our ``recon``), ``loss_KL`` (upstream's is beta * KL, ours ``kl`` is the KL
        alone), ``scale`` (the concentrations, logged as ``mean(z_scale)`` / ``max(z_scale)`` in training).
        """
        scale = values.pop("scale", None)
        for suffix, value in values.items():
            self.log(f"{stage}_{suffix}", value, batch_size=batch_size, sync_dist=stage != "train")
        if stage != "train":
            return
        trainer = self._attached()
        if trainer is not None and trainer.optimizers:
            self.log("learning_rate", float(trainer.optimizers[0].param_groups[0]["lr"]), batch_size=batch_size)
        if scale is not None:
            self.log("mean(z_scale)", scale.detach().float().mean(), batch_size=batch_size)
            self.log("max(z_scale)", scale.detach().float().max(), batch_size=batch_size)

    # A NaN/inf loss stops the run with a NonFiniteLossError before it reaches the weights. Validation and test
    # check at once; training checks the step's loss terms together with its gradients just before the optimizer
    # step (one synchronisation per step, after the backward pass is queued): raising there keeps the weights of the
    # last good step, where trainer.should_stop would let this step write NaN into them and the end-of-fit
    # checkpoints save them.
    def _check_finite(self, stage: str, terms: dict[str, torch.Tensor]) -> None:
        if stage == "train":
            self._train_terms = {k: v.detach() for k, v in terms.items()}
            return
        if not bool(torch.isfinite(torch.stack([t.detach().float() for t in terms.values()])).all()):
            raise NonFiniteLossError(self._diverged(stage, terms))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        terms, self._train_terms = getattr(self, "_train_terms", None), None
        if not terms:
            return
        values = [t.float().reshape(()) for t in terms.values()]
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # fp16 AMP skips steps with inf gradients by design (its GradScaler): there, check the loss only
        trainer = self._attached()
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        if grads and scaler is None:
            values.append(torch.nn.utils.get_total_norm(grads, math.inf).to(values[0]))  # max |g|: NaN/inf stay
        if not bool(torch.isfinite(torch.stack(values)).all()):
            raise NonFiniteLossError(self._diverged("train", terms))

    def _attached(self) -> pl.Trainer | None:
        """The trainer running this module, None outside one (Lightning's ``trainer`` property raises there)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _diverged(self, stage: str, terms: dict[str, torch.Tensor], what: str | None = None) -> str:
        """The one-line message (where, which term or gradient, what to try), remembered for on_save_checkpoint."""
        self._divergence = self._divergence_message(stage, terms, what)
        return self._divergence

    def _divergence_message(self, stage: str, terms: dict[str, torch.Tensor], what: str | None) -> str:
        shown = {_TERMS.get(k, k): float(v) for k, v in terms.items()}
        bad = [name for name, value in shown.items() if not math.isfinite(value)]
        others = ", ".join(f"{name} {value:.4g}" for name, value in shown.items() if name not in bad)
        if what is None and bad:
            what = " and ".join(f"the {name} is {shown[name]}" for name in bad) + (f" ({others})" if others else "")
        elif what is None:
            bad_grads = (n for n, p in self.named_parameters() if p.grad is not None and not p.grad.isfinite().all())
            name = next(bad_grads, "?")
            what = f"the loss is finite ({others}) but the gradient of {name!r} is not"
        where = f"{stage} batch {getattr(self, '_batch_idx', '?')} of epoch {self.current_epoch}"
        if stage != "train":
            trained = f"training had finite losses up to step {self.global_step}" if self.global_step else "no step ran"
            return (
                f"{where}: {what}; {trained}, so look at the {stage} data for values of extreme size (rescale or "
                f"normalise them)"
            )
        lr = ""
        trainer = self._attached()
        if trainer is not None and trainer.optimizers:
            lr = f", now {trainer.optimizers[0].param_groups[0]['lr']:g}"
        return (
            f"{where} (step {self.global_step}): {what}; the run stops before this step changes the weights. Lower "
            f"the learning rate (optimizer.init_args.lr{lr}), clip gradients (trainer.gradient_clip_val, e.g. 1.0), "
            f"or look at the data for values of extreme size"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write non-finite weights (BatchNorm statistics, say, of the forward pass of a step refused).

        The hyperparameters lose their ``weights`` files: the checkpoint holds the weights, and rebuilding its
        model must not need the file the training started from.
        """
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = drop_weight_sources(checkpoint["hyper_parameters"])
        state = [(k, v) for k, v in checkpoint.get("state_dict", {}).items() if v.is_floating_point() and v.numel()]
        if not state or bool(torch.stack([v.isfinite().all() for _, v in state]).all()):
            return
        name = next(k for k, v in state if not v.isfinite().all())
        reason = getattr(self, "_divergence", None)
        if reason is None:  # finite losses: weights grown so large that statistics of their outputs overflow
            largest = max(float(p.detach().abs().max()) for p in self.parameters() if p.numel())
            reason = (
                f"finite losses, with weights up to {largest:.3g}; lower the learning rate or clip gradients "
                f"(trainer.gradient_clip_val)"
            )
        raise NonFiniteLossError(
            f"not saving a checkpoint at step {self.global_step} (epoch {self.current_epoch}): {name!r} is not "
            f"finite after {reason}"
        )

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def _reconstruction_error(self, x_hat: torch.Tensor, x: torch.Tensor, batch: Any) -> torch.Tensor:
        """The reconstruction loss; a loss that weighs values by their errors (``takes_error``, e.g.
        :class:`~spherinator.losses.GaussianNLLLoss`) also gets the batch's errors."""
        loss = self.reconstruction_loss
        if getattr(loss, "takes_error", False):
            return loss(x_hat, x, loss.error_of(batch))
        return loss(x_hat, x)

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor | list[str]]:
        x = model_input(batch)
        out = self._predict(x)
        if isinstance(batch, dict):
            for name, column in list(batch.items())[1:]:  # per-row columns: ids, labels, object names (list of str)
                per_row = isinstance(column, torch.Tensor) and column.dim() == 1 or _is_strings(column)
                if per_row and len(column) == len(x):
                    out.setdefault(name, column)
        return out

    def _predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with lr 1e-3; the ``optimizer:`` section of a ``spherinator`` config replaces it."""
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Autoencoder(_AutoencoderBase):
    """Deterministic autoencoder: the code of the encoder is decoded directly, without sampling.

    Args:
        encoder: Maps (B, *input_dim) to the code (B, d); its ``output_dim`` (if any) is the latent size d.
        decoder: Maps (B, d) back to (B, *input_dim); its ``input_dim``/``output_dim`` may be left out and follow
            the encoder.
        reconstruction_loss: Loss module (or class) called as ``loss(prediction, target)``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        reconstruction_loss: nn.Module | type[nn.Module] = nn.MSELoss,
    ) -> None:
        super().__init__()
        with _modules_in_hparams_allowed():
            self.save_hyperparameters()
        self.encoder = encoder
        self.decoder = decoder
        self.reconstruction_loss = _as_loss(reconstruction_loss)
        self.input_dim = getattr(encoder, "input_dim", None)
        self.z_dim = getattr(encoder, "output_dim", None)
        if self.z_dim is None and self.input_dim is not None:  # an encoder without output_dim: measure its code
            self.z_dim = dry_forward(encoder, encoder, torch.zeros(1, *self.input_dim)).shape[-1]
        self._wire_shapes(self.z_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, d)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, *input_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x = model_input(batch)
        self._remember_input_dim(x)
        with self._batchnorm_single_sample(len(x)):
            x_hat = self(x)
        self._check_reconstruction_shape(tuple(x_hat.shape[1:]), tuple(x.shape[1:]))
        loss = self._reconstruction_error(x_hat, x, batch)
        self._log_losses(stage, len(x), loss=loss)
        self._log_upstream_names(stage, len(x))
        return loss

    def _predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"location": self.encode(x)}


_FORWARD_UNPACKED = (
    "VariationalAutoencoder(x) returns the reconstruction tensor (B, *input_dim) through the posterior location, "
    "not upstream Spherinator's ((loc, scale), (q_z, p_z), z, recon): unpacking it would split the batch. Call "
    "model.forward_sampled(x) for upstream's tuple, or iterate rows with x_hat.unbind(0)"
)
_ENCODE_UNPACKED = (
    "VariationalAutoencoder.encode(x) returns the location tensor (B, z_dim), not upstream Spherinator's "
    "(loc, scale): unpacking it would split the batch. Call model.encode_posterior(x) for (loc, scale), or iterate "
    "rows with z.unbind(0)"
)


class VariationalAutoencoder(_AutoencoderBase):
    """VAE with a Power Spherical posterior on the unit sphere S^{z_dim-1} and a uniform prior.

    Loss = reconstruction + beta * KL(posterior || uniform). ``beta`` is a plain attribute that callbacks such as
    ``KLAnnealing`` may change during training. The distribution is built and sampled in float32 with autocast
    disabled, so ``precision: bf16-mixed`` works.

    Args:
        encoder: Backbone mapping (B, *input_dim) -> (B, encoder_out_dim); wrapped in a ``VariationalEncoder``.
        decoder: Maps (B, z_dim) back to (B, *input_dim); its ``input_dim``/``output_dim`` may be left out.
        encoder_out_dim: Output size of the backbone; None takes ``encoder.output_dim``.
        z_dim: Dimension of the latent space; 3 maps to the sphere S^2.
        beta: Weight of the KL divergence.
        reconstruction_loss: Loss module (or class) called as ``loss(prediction, target)``.
        max_scale: Upper bound of the posterior concentration; None for none (upstream's default).
        fixed_scale: Upstream Spherinator 0.5's option: a concentration that is not learned. The scale head's
            weights are zeroed and frozen and its bias set to ``fixed_scale``, so every posterior has the
            concentration softplus(fixed_scale) + 1 (then bounded by max_scale). None learns it.
        centre: Centre the locations over the batch before normalising them (``VariationalEncoder``); off for
            upstream Spherinator's head (converted upstream checkpoints) and the README's cases for it.

    Python API: ``forward(x)`` is the deterministic reconstruction (B, *input_dim) and ``encode(x)`` the location
    (B, z_dim), not upstream Spherinator's tuples; unpacking either result raises a TypeError naming what to call
    (``forward_sampled``, ``encode_posterior``) instead of splitting the batch. ``reconstruct`` and
    ``reparameterize`` give upstream's values.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        encoder_out_dim: int | None = None,
        z_dim: int = 3,
        beta: float = 1.0e-3,
        reconstruction_loss: nn.Module | type[nn.Module] = nn.MSELoss,
        max_scale: float | None = 1.0e4,
        fixed_scale: float | None = None,
        centre: bool = True,
    ) -> None:
        super().__init__()
        with _modules_in_hparams_allowed():
            self.save_hyperparameters()
        if int(z_dim) < 2:
            raise ValueError(
                f"z_dim must be >= 2 (the latent space is a sphere in R^z_dim), got {z_dim}; "
                "set model.init_args.z_dim to 2 or more (3: the sphere S^2)"
            )
        if not (math.isfinite(beta) and beta >= 0.0):
            raise ValueError(
                f"beta (the weight of the KL divergence in the loss) must be a finite number >= 0, got {beta}; "
                "a negative one rewards a large KL and drives the loss below zero (e.g. beta: 1.0e-4)"
            )
        if max_scale is not None and not max_scale > 1.0:
            raise ValueError(
                f"max_scale must be > 1 (the concentration is softplus + 1) or null for no bound, got {max_scale}"
            )
        backbone_out = getattr(encoder, "output_dim", None)
        if encoder_out_dim is None:
            if backbone_out is None:
                raise ValueError(
                    f"encoder_out_dim is not given and the encoder {type(encoder).__name__} has no output_dim; "
                    "set model.init_args.encoder_out_dim to the encoder's output size"
                )
            encoder_out_dim = int(backbone_out)
        elif backbone_out is not None and int(backbone_out) != int(encoder_out_dim):
            raise ValueError(
                f"encoder_out_dim {encoder_out_dim} disagrees with the encoder's output_dim {backbone_out}; "
                "make them equal or leave encoder_out_dim out to take it from the encoder"
            )
        self.z_dim = int(z_dim)
        self.encoder_out_dim = int(encoder_out_dim)
        self.beta = float(beta)
        bound = math.inf if max_scale is None else max_scale
        self.encoder = VariationalEncoder(encoder, self.encoder_out_dim, self.z_dim, bound, centre=bool(centre))
        if fixed_scale is not None:
            fix_concentration(self.encoder.fc_scale, fixed_scale)
        self.decoder = decoder
        self.reconstruction_loss = _as_loss(reconstruction_loss)
        self.input_dim = self.encoder.input_dim
        self._wire_shapes(self.z_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm location of the posterior, (B, z_dim); see ``encode_posterior`` for (location, scale)."""
        return no_unpacking(self.encoder(x)[0], _ENCODE_UNPACKED)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, *input_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction through the posterior location; ``forward_sampled`` is upstream's."""
        return no_unpacking(self.decode(self.encoder(x)[0]), _FORWARD_UNPACKED)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction through the posterior location, (B, *input_dim), as upstream's."""
        return self.decode(self.encoder(x)[0])

    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream Spherinator's ``encode``: the location (B, z_dim) and the concentration (B, 1)."""
        location, scale = self.encoder(x)
        return location, scale.unsqueeze(-1)

    def reparameterize(
        self, location: torch.Tensor, scale: torch.Tensor
    ) -> tuple[PowerSpherical, HypersphericalUniform]:
        """Upstream's ``reparameterize``: the posterior q_z and the uniform prior p_z (scale (B,) or (B, 1))."""
        scale = scale.squeeze(-1) if scale.dim() == location.dim() else scale
        return self.posterior(location, scale), HypersphericalUniform(self.z_dim, device=location.device)

    def forward_sampled(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple, torch.Tensor, Any]:
        """Upstream Spherinator's ``forward``: ``((location, scale), (q_z, p_z), z, reconstruction)``, where z is
        a sample of the posterior and the reconstruction decodes it (so it is random, unlike ``forward``)."""
        location, scale = self.encode_posterior(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q_z, p_z = self.reparameterize(location, scale)
            z = q_z.rsample()
        return (location, scale), (q_z, p_z), z, self.decode(z)

    def posterior(self, location: torch.Tensor, scale: torch.Tensor) -> PowerSpherical:
        """Power Spherical posterior; build and sample it under ``torch.autocast(..., enabled=False)``."""
        return PowerSpherical(location.float(), scale.float())

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x = model_input(batch)
        self._remember_input_dim(x)
        with self._batchnorm_single_sample(len(x)):
            location, scale = self.encoder(x)
            with torch.autocast(device_type=x.device.type, enabled=False):
                try:
                    q = self.posterior(location, scale)
                except ValueError:  # the distribution's own check of its parameters (it names no cause)
                    params = {"location": location, "scale": scale}
                    bad = [
                        f"{k} {v.detach()[~v.isfinite()][0].item()}"
                        for k, v in params.items()
                        if not v.isfinite().all()
                    ]
                    if not bad:
                        raise
                    what = f"the encoder's posterior is not finite ({', '.join(bad)}), before any loss"
                    raise NonFiniteLossError(self._diverged(stage, {}, what)) from None
                z = q.rsample()  # (B, z_dim) float32
                kl = kl_divergence(q, HypersphericalUniform(self.z_dim, device=z.device)).mean()
            x_hat = self.decode(z)
        self._check_reconstruction_shape(tuple(x_hat.shape[1:]), tuple(x.shape[1:]))
        recon = self._reconstruction_error(x_hat, x, batch)
        loss = recon + self.beta * kl
        self._log_losses(stage, len(x), loss=loss, recon=recon, kl=kl)
        self._log_upstream_names(stage, len(x), loss_recon=recon, loss_KL=self.beta * kl, scale=scale)
        return loss

    def _predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        location, scale = self.encoder(x)
        return {"location": location, "scale": scale}
