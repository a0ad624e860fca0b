"""Upstream Spherinator (HITS-AIN/Spherinator 0.5.x, PyPI ``spherinator``) checkpoints as checkpoints of ours.

An upstream checkpoint stores only its model's class path in its hyper-parameters, so the run's saved
``cli-config.yaml`` (the one LightningCLI writes, and W&B uploads) describes the architecture. :func:`convert_upstream`
reads both and writes an ordinary spherinator checkpoint (hyper-parameters with class paths, state dict under our
key names, the run's epoch and step): ``export``, ``evaluate``, ``atlas`` and ``fit --ckpt_path`` take it, and its
reconstructions equal upstream's. What upstream builds differently is set explicitly: no batch centring of the
sphere head (``centre: false``), BatchNorm + ReLU after the decoders' seed projection (``seed_norm: true``),
``UpsamplingDecoder2D``'s channel floor of 32 (``min_channels: 32``) and no cap on the concentration.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import io
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from spherinator.errors import CheckpointError, ConfigError, OutputError

OUR_VAE = "spherinator.models.VariationalAutoencoder"
_UPSTREAM_PREFIXES = ("spherinator.models.",)
# Upstream settings that mean their default here when absent; any other value cannot be carried (one line says so).
_UPSTREAM_DEFAULTS: dict[str, Any] = {"output_padding": 0, "dilation": 1, "bias": True, "freeze": False}
_DROPPED = ("weights",)  # the checkpoint holds the trained weights themselves
_CLASS_VALUED = ("activation", "norm")  # settings that are a class here (upstream: a callable)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# Upstream's `fc` Sequentials: the encoder's (Flatten, Linear), the decoders' (Linear, Unflatten, BatchNorm, ReLU).
_SEQUENTIAL_HEADS = {"fc.1.": "fc.", "fc.0.": "fc.", "fc.2.": "seed_block.0."}


@dataclass
class Converted:
    """What :func:`convert_upstream` wrote.

    Attributes:
        path: The checkpoint of ours.
        config: Beside it (``.yaml``): the model section of ours, plus the run's optimizer and lr_scheduler, for
            ``spherinator fit -c CONFIG -c DATA --ckpt_path PATH``.
        hyper_parameters: Its model settings (``_class_path`` and the init arguments), as ``fit`` would store them.
        notes: Upstream settings that were dropped or changed, one line each.
    """

    path: Path
    config: Path
    hyper_parameters: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def convert_upstream(
    checkpoint: str | Path, config: str | Path, output: str | Path, overwrite: bool = False
) -> Converted:
    """Convert an upstream Spherinator checkpoint plus its run's ``cli-config.yaml`` into a checkpoint of ours.

    Args:
        checkpoint: The upstream ``.ckpt`` (read weights-only).
        config: The upstream run's saved config (``cli-config.yaml`` / ``config.yaml``) with a ``model`` section.
        output: Where the converted ``.ckpt`` goes; its model config goes beside it as ``.yaml``.
        overwrite: Replace an existing ``output``.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or its weights do not fit the config's model.
        ConfigError: the config has no upstream VariationalAutoencoder, or a setting that cannot mean the same here.
        OutputError: ``output`` exists (without ``overwrite``) or cannot be written.
    """
    out = Path(output)
    _check_outputs(out, (Path(checkpoint), Path(config)), overwrite)
    upstream = _read_upstream_checkpoint(Path(checkpoint))
    sections = _read_sections(Path(config))
    init_args, notes = model_init_args(sections["model"], upstream["state_dict"])
    from spherinator.export.checkpoint import build_model

    model = build_model(OUR_VAE, copy.deepcopy(init_args), f"upstream config '{config}'")  # it edits in place
    state = upstream_state_dict(upstream["state_dict"], model)
    _load_strictly(model, state, checkpoint)
    hparams = {"_class_path": OUR_VAE, "_instantiator": "lightning.pytorch.cli.instantiate_module", **init_args}
    ours = _lightning_fields(upstream, model)
    ours.update({"state_dict": model.state_dict(), "hyper_parameters": hparams, "hparams_name": "kwargs"})
    ours["spherinator_upstream"] = {"checkpoint": str(checkpoint), "config": str(config), "notes": notes}
    sections["model"] = {"class_path": OUR_VAE, "init_args": init_args}
    text = "# spherinator convert-upstream: the model (and optimizer) of the upstream run, in our settings\n"
    buffer = io.BytesIO()  # torch.save reports a full disk as a RuntimeError; writing the bytes, as an OSError
    torch.save(ours, buffer)
    _write(out, lambda partial: partial.write_bytes(buffer.getbuffer()))
    _write(
        out.with_suffix(".yaml"), lambda partial: partial.write_text(text + yaml.safe_dump(sections, sort_keys=False))
    )
    return Converted(path=out, config=out.with_suffix(".yaml"), hyper_parameters=hparams, notes=notes)


def _check_outputs(out: Path, inputs: tuple[Path, ...], overwrite: bool) -> None:
    """Refuse outputs that would replace an input, each other, or a folder, and existing ones without overwrite."""
    config = out.with_suffix(".yaml")
    if config == out:
        raise OutputError(f"-o {out} names the config's place; give the checkpoint's, e.g. {out.with_suffix('.ckpt')}")
    for target in (out, config):
        if any(target.resolve() == given.resolve() for given in inputs):
            raise OutputError(f"{target} is an input of this conversion; give -o another path (the inputs stay)")
        if target.is_dir():
            raise OutputError(f"{target} is a directory; give -o a file path, e.g. {target / 'converted.ckpt'}")
        if target.exists() and not overwrite:
            raise OutputError(f"{target} exists; pass --overwrite to replace it or give another -o")


def _write(out: Path, save: Callable[[Path], Any]) -> None:
    """``save`` to a temporary name beside ``out``, then rename: a full disk leaves no cut-short file."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save(partial)
        partial.replace(out)
    except OSError as err:
        raise OutputError(f"cannot write {out} ({err.strerror or err}); free space or give -o a writable path") from err
    finally:
        partial.unlink(missing_ok=True)


def _read_upstream_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"upstream checkpoint '{path}' does not exist; pass the .ckpt file of the upstream run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"'{path}' is not a PyTorch checkpoint torch reads weights-only ({first})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"'{path}' is no Lightning checkpoint (no 'state_dict'); pass an upstream run's .ckpt")
    if any(key.startswith("encoder.encoder.") for key in ckpt["state_dict"]):
        raise CheckpointError(f"'{path}' is a spherinator checkpoint already (not upstream's); use it as it is")
    return ckpt


def _read_sections(path: Path) -> dict[str, Any]:
    """The ``model`` section of an upstream run's config, with its ``optimizer``/``lr_scheduler`` (fit's syntax is
    LightningCLI's in both, so these carry over; a resumed run needs the optimizer its state belongs to)."""
    from spherinator.config import load_yaml

    if not path.is_file():
        raise ConfigError(f"upstream config '{path}' does not exist; pass the run's saved cli-config.yaml")
    cfg = load_yaml(path.read_text(), f"upstream config '{path}'")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not str(model.get("class_path", "")).endswith("VariationalAutoencoder"):
        found = model.get("class_path") if isinstance(model, dict) else None
        raise ConfigError(
            f"upstream config '{path}' has no model.class_path VariationalAutoencoder (found {found!r}); pass the "
            "cli-config.yaml saved in the upstream run's log directory"
        )
    return {key: cfg[key] for key in ("model", "optimizer", "lr_scheduler") if cfg.get(key) is not None}


def model_init_args(model: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[str]]:
    """Our VariationalAutoencoder's init arguments for an upstream ``model`` config section, and notes.

    ``state`` (the upstream state dict) decides what the config leaves open (a ViT's projection).
    """
    args = model.get("init_args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"upstream model.init_args is {args!r}, not a mapping; pass the run's saved config")
    args = dict(args)
    notes: list[str] = []
    loss = args.pop("loss", "MSE")
    if "reconstruction_loss" in args:
        loss_cfg = _map_class(args.pop("reconstruction_loss"), "reconstruction_loss", notes)
    elif loss == "MSE":
        loss_cfg = {"class_path": "torch.nn.MSELoss"}
    else:
        raise ConfigError(
            f"upstream loss {loss!r} weights by the data's error column, which this conversion does not carry; "
            "convert a run trained with loss: MSE, or write the loss you want as reconstruction_loss"
        )
    max_scale = args.pop("max_scale", None)
    if max_scale is not None and (isinstance(max_scale, bool) or not isinstance(max_scale, (int, float))):
        raise ConfigError(f"upstream max_scale {max_scale!r} is not a number; give a number > 1 or null (no cap)")
    missing = [key for key in ("encoder", "decoder") if key not in args]
    if missing:
        raise ConfigError(f"upstream model.init_args has no {' or '.join(missing)}; pass the run's saved config")
    ours = {
        "encoder": _map_module(args.pop("encoder"), "encoder", state, notes),
        "decoder": _map_module(args.pop("decoder"), "decoder", state, notes),
        "encoder_out_dim": args.pop("encoder_out_dim", None),
        "z_dim": args.pop("z_dim", 3),
        "beta": args.pop("beta", 1.0),
        "reconstruction_loss": loss_cfg,
        "max_scale": math.inf if max_scale is None else float(max_scale),  # upstream: no cap unless given
        "fixed_scale": args.pop("fixed_scale", None),  # ours as upstream's: zeroed, frozen scale head
        "centre": False,  # upstream's sphere head has no batch centring
    }
    if args:
        raise ConfigError(f"upstream model setting(s) {sorted(args)} have no counterpart here; remove them")
    return ours, notes


def _map_class(cfg: Any, where: str, notes: list[str]) -> Any:
    """An upstream ``{class_path, init_args}`` with its class path and init arguments made ours."""
    if not isinstance(cfg, dict) or "class_path" not in cfg:
        return cfg
    path = _our_class_path(str(cfg["class_path"]))
    cls = _import(path, where)
    accepted = _parameters(cls)
    args = {}
    for key, value in (cfg.get("init_args") or {}).items():
        if key in _DROPPED:
            if value is not None:
                notes.append(f"{where}.weights: not read (the checkpoint holds the trained weights)")
            continue
        if accepted is not None and key not in accepted:
            if key in _UPSTREAM_DEFAULTS and value == _UPSTREAM_DEFAULTS[key]:
                continue  # upstream's default is ours
            raise ConfigError(
                f"{where}: upstream's {key}: {value!r} on {path} has no counterpart here; this checkpoint cannot be "
                "converted as it is"
            )
        args[key] = _map_value(value, f"{where}.{key}", notes)
    return {"class_path": path, "init_args": args}


def _map_value(value: Any, where: str, notes: list[str]) -> Any:
    if isinstance(value, list):
        return [_map_value(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    if isinstance(value, dict) and "class_path" in value:
        if where.rsplit(".", 1)[-1] in _CLASS_VALUED:
            return _as_class(value, where)
        return _map_class(value, where, notes)
    return value


def _as_class(value: dict[str, Any], where: str) -> str:
    """``activation: {class_path: torch.nn.ReLU}`` (jsonargparse's form of upstream's callables): the class itself,
    which is what ours take; init arguments other than the class's defaults cannot be carried."""
    path = str(value["class_path"])
    cls = _import(path, where)
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    changed = {k: v for k, v in (value.get("init_args") or {}).items() if defaults.get(k, object()) != v}
    if changed:
        raise ConfigError(f"{where}: {path} with {changed} cannot be carried (here {where} is a class); remove them")
    return path


def _map_module(cfg: Any, where: str, state: dict[str, torch.Tensor], notes: list[str]) -> Any:
    mapped = _map_class(cfg, where, notes)
    if not isinstance(mapped, dict):
        raise ConfigError(f"upstream model.init_args.{where} is not a class_path section; pass the run's saved config")
    name = mapped["class_path"].rsplit(".", 1)[-1]
    args = mapped["init_args"]
    if name in ("ConvolutionalDecoder1D", "ConvolutionalDecoder2D", "UpsamplingDecoder2D"):
        args["seed_norm"] = True  # upstream's BatchNorm + ReLU after the seed projection
    if name == "UpsamplingDecoder2D":
        args["min_channels"] = 32  # upstream's channel floor
    if name == "HuggingFaceViTEncoder" and not any(k.startswith("encoder.projection.") for k in state):
        args["output_dim"] = None  # upstream's output_dim equal to the hidden size: no projection
    return mapped


def _our_class_path(path: str) -> str:
    """``spherinator.models.convolutional_encoder_2d.ConvolutionalEncoder2D`` -> ``spherinator.models.X``."""
    if path.startswith(_UPSTREAM_PREFIXES):
        import spherinator.models as models

        name = path.rsplit(".", 1)[-1]
        if not hasattr(models, name):
            raise ConfigError(f"upstream class {path} has no counterpart in spherinator.models; it cannot be converted")
        return f"spherinator.models.{name}"
    return path


def _import(path: str, where: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"{where}: cannot import {path} ({err}); the upstream config names a class unknown here"
        ) from err


def _parameters(cls: Any) -> set[str] | None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def upstream_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Upstream's state dict under our key names for ``model`` (our VariationalAutoencoder built from the config).

    Upstream 0.5.x: ``encoder.*`` (again as ``variational_encoder.encoder.*``), ``variational_encoder.fc_*``;
    upstream HEAD: ``sphere_head.fc_*``. Conv stacks nest ``cnn.i.j.k`` where ours are flat ``cnn.i.m``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("variational_encoder.encoder."):
            continue  # the same backbone, registered twice upstream
        head = re.match(r"(?:variational_encoder|sphere_head)\.(fc_location|fc_scale)\.(.*)", key)
        if head:
            out[f"encoder.{head.group(1)}.{head.group(2)}"] = value
        elif key.startswith("encoder."):
            name = _module_key(key[len("encoder.") :], model.encoder.encoder)
            if name is not None:
                out[f"encoder.encoder.{name}"] = value
        elif key.startswith("decoder."):
            out[f"decoder.{_module_key(key[len('decoder.') :], model.decoder)}"] = value
        else:
            out[key] = value  # left for the strict load to name
    return out


def _module_key(key: str, module: nn.Module) -> str | None:
    """One encoder/decoder key, upstream -> ours (None: a key ours has no module for, as a ViT's pooler)."""
    cnn = re.match(r"cnn\.(\d+)\.(\d+)\.(\d+)\.(.*)", key)
    if cnn:
        block, conv, part, rest = int(cnn.group(1)), int(cnn.group(2)), int(cnn.group(3)), cnn.group(4)
        stack = module.cnn[block]
        per_conv = len(stack) // len(getattr(stack, "out_channels", [None]))
        return f"cnn.{block}.{conv * per_conv + part}.{rest}"
    if key.startswith("vit.pooler."):
        return None
    for upstream, ours in _SEQUENTIAL_HEADS.items():
        if key.startswith(upstream):
            return ours + key[len(upstream) :]
    blocks = re.match(r"upsample_blocks\.(\d+)\.block\.(.*)", key)
    if blocks:
        return f"blocks.{blocks.group(1)}.{blocks.group(2)}"
    return key


def _load_strictly(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    if missing or unexpected:
        parts = [f"{label}: {', '.join(keys[:3])}" for label, keys in (("missing", missing), ("left over", unexpected))
                 if keys]  # fmt: skip
        raise CheckpointError(
            f"upstream checkpoint '{checkpoint}' does not fit the model of its config ({'; '.join(parts)}); pass the "
            "cli-config.yaml saved in the same upstream run"
        )


def _lightning_fields(upstream: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The run's place (epoch, step, loops) and optimizer state, re-indexed to our parameter order, so that
    ``fit --ckpt_path`` continues the run; an optimizer state that does not map is left out (a fresh optimizer)."""
    import lightning

    fields = {key: upstream[key] for key in ("epoch", "global_step", "loops") if key in upstream}
    fields["pytorch-lightning_version"] = lightning.__version__
    fields["optimizer_states"] = _reindexed_optimizers(upstream, model)
    fields["lr_schedulers"] = upstream.get("lr_schedulers", []) if fields["optimizer_states"] else []
    return fields


def _reindexed_optimizers(upstream: dict[str, Any], model: nn.Module) -> list[dict[str, Any]]:
    states = upstream.get("optimizer_states") or []
    if len(states) != 1 or len(states[0].get("param_groups", [])) != 1:
        return []
    # Upstream's parameter order: its state dict's parameters, each module once (not the duplicated backbone).
    names = [k for k in upstream["state_dict"] if not k.startswith("variational_encoder.encoder.")]
    names = [k for k in names if not k.endswith(_BUFFERS)]
    renamed = list(upstream_state_dict({k: torch.empty(0) for k in names}, model))
    ours = [name for name, _ in model.named_parameters()]
    if len(renamed) != len(ours) or sorted(renamed) != sorted(ours):
        return []
    index = {name: i for i, name in enumerate(renamed)}
    state, group = states[0], dict(states[0]["param_groups"][0])
    group["params"] = list(range(len(ours)))
    moved = {new: state["state"][index[name]] for new, name in enumerate(ours) if index[name] in state["state"]}
    return [{"state": moved, "param_groups": [group]}]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``spherinator convert-upstream``."""
    parser = argparse.ArgumentParser(
        prog="spherinator convert-upstream",
        description="Convert a checkpoint of upstream Spherinator (HITS-AIN/Spherinator 0.5.x) and its run's saved "
        "cli-config.yaml into a spherinator checkpoint (for export, evaluate, atlas, fit --ckpt_path).",
    )
    parser.add_argument("checkpoint", help="the upstream run's .ckpt file")
    parser.add_argument("-c", "--config", required=True, help="the upstream run's saved cli-config.yaml")
    parser.add_argument("-o", "--output", required=True, help="the converted .ckpt to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``spherinator convert-upstream``; a bad input ends in one line and exit status 2."""
    from spherinator.errors import one_line_errors

    args = build_parser().parse_args(argv)
    with one_line_errors("spherinator convert-upstream", list(argv or [])):
        converted = convert_upstream(args.checkpoint, args.config, args.output, overwrite=args.overwrite)
    for note in converted.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {converted.path} and {converted.config} (fit -c {converted.config} -c DATA --ckpt_path ...)")
