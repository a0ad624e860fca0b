"""``Sequential``: ``torch.nn.Sequential`` with a ``modules`` list, so that a YAML config can compose modules."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from spherinator.errors import ConfigError


class Sequential(nn.Sequential):
    """Modules applied in order, written in a config as ``init_args: {modules: [{class_path: ...}, ...]}``.

    Upstream Spherinator's class and YAML form (``torch.nn.Sequential`` takes ``*args``, which a config cannot give).
    It passes the shape protocol of encoders and decoders through: ``input_dim`` is its first module's (a
    ``Linear``'s ``in_features``), ``output_dim`` its last one's (a ``Linear``'s ``out_features``), and the model's
    ``set_input_dim`` / ``set_output_dim`` reach the first / last module.

    Args:
        modules: The modules, applied first to last.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        if not modules:
            raise ConfigError("Sequential: modules is empty; list at least one module (class_path and init_args)")
        super().__init__(*modules)

    @property
    def input_dim(self) -> object:
        first = self[0]
        return getattr(first, "input_dim", getattr(first, "in_features", None))

    @property
    def output_dim(self) -> object:
        last = self[-1]
        return getattr(last, "output_dim", getattr(last, "out_features", None))

    def set_input_dim(self, input_dim: int) -> None:
        """Give the first module the latent size, or check that it takes it."""
        first = self[0]
        if hasattr(first, "set_input_dim"):
            first.set_input_dim(input_dim)
        elif self.input_dim is not None and self.input_dim != int(input_dim):
            raise ConfigError(
                f"Sequential: its first module {type(first).__name__} takes {self.input_dim} features but the latent "
                f"size (the model's z_dim / the encoder's output_dim) is {input_dim}; make them equal"
            )

    def set_output_dim(self, output_dim: Sequence[int]) -> None:
        """Give the last module the sample shape when it takes one (a decoder)."""
        last = self[-1]
        if hasattr(last, "set_output_dim"):
            last.set_output_dim(output_dim)
