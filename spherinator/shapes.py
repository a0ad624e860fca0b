"""Each fact written once: fill in the sizes a config repeats, and refuse the ones that disagree.

In a spherinator config the same number appears in several places: ``z_dim`` and the decoder's ``input_dim``,
``encoder_out_dim`` and the encoder's ``output_dim``, the data's sample shape and the encoder's ``input_dim`` /
the decoder's ``output_dim``. :func:`resolve_config` fills in every one of them that is left out (or null) from
the one place that decides it, and raises :class:`ConfigError` naming both values when two given ones disagree.
It edits the parsed config in place before the classes are built, so what it infers is saved with the run's
``config.yaml`` and the checkpoint's hyperparameters.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace

from spherinator.errors import ConfigError


def _get(ns: Any, key: str) -> Any:
    return ns.get(key) if isinstance(ns, Namespace) else None


def _fill(ns: Namespace, key: str, value: Any, *, where: str, source: str, model_from: str | None = None) -> None:
    """Set ``ns[key]`` to ``value`` if it is null; if it is given and differs, raise naming both.

    ``model_from``: the checkpoint the model's settings were read from (they are not the user's to leave out).
    """
    if key not in ns:
        return
    given = ns[key]
    if given is None:
        ns[key] = value
        return
    given_cmp = list(given) if isinstance(given, list | tuple) else given
    value_cmp = list(value) if isinstance(value, list | tuple) else value
    if given_cmp != value_cmp and model_from is not None:
        raise ConfigError(
            f"{where} is {given_cmp} in the checkpoint {model_from} (the model was trained on that) but "
            f"{source} is {value_cmp}: give it data of that shape (e.g. resize with a transform in "
            f"data.init_args.columns), or train a new model without --ckpt_path"
        )
    if given_cmp != value_cmp:
        raise ConfigError(
            f"{where} is {given_cmp} but {source} is {value_cmp}: leave {where} out of the config "
            f"(it is taken from {source}) or make the two equal"
        )


def data_sample_shape(data_config: Namespace) -> tuple[int, ...]:
    """Build the data module a config describes and ask it for the shape of one input sample."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parsed = parser.parse_object({"data": data_config.as_dict()})
    datamodule = parser.instantiate(parsed).data
    if not hasattr(datamodule, "sample_shape"):
        raise ConfigError(
            f"the model's input shape is not in the config and {type(datamodule).__name__} cannot tell it: "
            "set model.init_args.encoder.init_args.input_dim"
        )
    return tuple(datamodule.sample_shape())


def resolve_config(config: Namespace, model_from: str | None = None) -> tuple[int, ...] | None:
    """Fill in the repeated sizes of ``config`` (a parsed ``spherinator`` config with ``model`` and ``data``).

    ``model_from``: the checkpoint whose hyperparameters the model settings come from (``--ckpt_path``), named
    in errors. Returns the data's sample shape when it had to be read (None otherwise), so callers need not read
    it again.
    """
    model = _get(config, "model")
    if not isinstance(model, Namespace) or not isinstance(model.get("init_args"), Namespace):
        return None
    args = model.init_args
    encoder = _get(args, "encoder.init_args")
    decoder = _get(args, "decoder.init_args")

    # The encoder's size decides encoder_out_dim.
    encoder_out = _get(encoder, "output_dim")
    if encoder_out is not None and "encoder_out_dim" in args:
        _fill(args, "encoder_out_dim", encoder_out, where="model encoder_out_dim", source="the encoder's output_dim")

    # z_dim (VAE) or the encoder's code size (plain autoencoder) decides the decoder's input size.
    if "z_dim" in args:
        latent, latent_name = args.z_dim, "model z_dim"
    else:
        latent, latent_name = encoder_out, "the encoder's output_dim"
    # A latent size no decoder can take (z_dim 0 or -3) is left to the model to refuse, so the error names z_dim
    # rather than the decoder's input_dim it would have been copied into.
    if decoder is not None and isinstance(latent, int) and latent > 0:
        _fill(decoder, "input_dim", latent, where="the decoder's input_dim", source=latent_name)

    # The data decides the input shape of the encoder and the output shape of the decoder.
    needs_shape = (encoder is not None and "input_dim" in encoder) or (decoder is not None and "output_dim" in decoder)
    data = _get(config, "data")
    if not (needs_shape and isinstance(data, Namespace) and data.get("class_path")):
        return None
    shape = data_sample_shape(data)
    source = "the data's sample shape"
    if encoder is not None:
        _fill(encoder, "input_dim", list(shape), where="the encoder's input_dim", source=source, model_from=model_from)
    if decoder is not None:
        _fill(
            decoder, "output_dim", list(shape), where="the decoder's output_dim", source=source, model_from=model_from
        )
    return shape


def check_model_matches_data(model: Any, datamodule: Any, data_shape: tuple[int, ...] | None = None) -> None:
    """Refuse a model whose input shape is not the shape of the data's samples (e.g. a ViT fed 128x128).

    ``data_shape``: the sample shape when already known (from :func:`resolve_config`); else asked of the data.
    """
    model_shape = getattr(model, "input_dim", None)
    if model_shape is None or datamodule is None or not hasattr(datamodule, "sample_shape"):
        return
    data_shape = tuple(data_shape) if data_shape is not None else tuple(datamodule.sample_shape())
    if tuple(model_shape) != data_shape:
        raise ConfigError(
            f"the model takes inputs of shape {tuple(model_shape)} but the data's samples have shape {data_shape}: "
            "resize the data with a transform in data.init_args.columns, or build the model for that shape"
        )
