"""Rebuild a trained spherinator model from a Lightning checkpoint, with or without the run's config.yaml."""

from __future__ import annotations

import inspect
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from spherinator.errors import ConfigError, ExportError  # noqa: F401 (ExportError re-exported)


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode, plus what the export records about it.

    Attributes:
        model: The LightningModule with the checkpoint's weights.
        class_path: Import path of the model class, e.g. ``spherinator.models.VariationalAutoencoder``.
        training_config: YAML text of the training configuration (the config file, else the checkpoint's
            hyper-parameters).
        source: Where the architecture came from, for messages (``config 'x.yaml'`` or ``checkpoint 'y.ckpt'``).
    """

    model: nn.Module
    class_path: str
    training_config: str
    source: str


def load_model(checkpoint: str | Path, config: str | Path | None = None, trust: bool = False) -> LoadedModel:
    """Rebuild the model stored in ``checkpoint`` and load its weights (strictly), in eval mode on CPU.

    The architecture comes from ``config`` (a LightningCLI config.yaml with a ``model`` section) when given,
    else from the checkpoint's hyper-parameters: LightningCLI stores the ``class_path`` of the model and the
    class_path/init_args of its encoder and decoder there; a model built in Python stores its modules.

    The checkpoint is read weights-only (tensors and plain data). A model built in Python pickles its modules
    into the hyper-parameters, and unpickling those runs code named by the file: only with ``trust`` is such a
    file read in full.

    Raises:
        ExportError: missing or unreadable checkpoint, one that needs a full unpickle without ``trust``, a config
            without a usable ``model`` section, or weights that do not fit the architecture.
    """
    ckpt_path = Path(checkpoint)
    ckpt = _read_checkpoint(ckpt_path, trust)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    stored_class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)

    if config is not None:
        class_path, init_args, config_text = _read_config(Path(config))
        if stored_class_path is not None and stored_class_path != class_path:
            raise ExportError(
                f"checkpoint '{ckpt_path}' was trained as {stored_class_path} but config '{config}' builds "
                f"{class_path}; pass the config.yaml saved in the same run's log directory"
            )
        model = build_model(class_path, init_args, f"config '{config}'")
        source = f"config '{config}'"
    elif stored_class_path is not None:
        class_path, init_args = stored_class_path, hparams
        model = build_model(class_path, init_args, f"checkpoint '{ckpt_path}'")
        config_text = yaml.safe_dump({"model": {"class_path": class_path, "init_args": _plain(init_args)}})
        source = f"checkpoint '{ckpt_path}'"
    else:
        model, class_path = _instantiate_python_hparams(hparams, ckpt_path)
        config_text = yaml.safe_dump({"model": {"class_path": class_path, "init_args": _plain(hparams)}})
        source = f"checkpoint '{ckpt_path}'"

    _load_weights(model, ckpt["state_dict"], ckpt_path, source)
    _check_model_contract(model, class_path)
    model.eval()
    return LoadedModel(model=model, class_path=class_path, training_config=config_text, source=source)


def _read_checkpoint(path: Path, trust: bool) -> dict[str, Any]:
    if not path.exists():
        raise ExportError(
            f"checkpoint '{path}' does not exist; pass the .ckpt file written by training "
            "(e.g. lightning_logs/version_0/checkpoints/last.ckpt)"
        )
    if path.is_dir():
        raise ExportError(f"checkpoint '{path}' is a directory; pass the .ckpt file inside it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not torch's weights-only refusal: a broken file
            raise ExportError(_not_a_checkpoint(path, err)) from err
        if not trust:
            raise ExportError(_refusal_message(path, str(err))) from err
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)  # the caller trusts this file
        except Exception as err2:
            raise ExportError(_not_a_checkpoint(path, err2)) from err2
    except Exception as err:
        raise ExportError(_not_a_checkpoint(path, err)) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ExportError(
            f"'{path}' is a torch file but not a Lightning checkpoint (no 'state_dict'; found: {found}); pass a "
            ".ckpt file saved by 'spherinator fit' or Trainer.save_checkpoint"
        )
    state, hparams = ckpt["state_dict"], ckpt.get("hyper_parameters")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"'{path}' is not a Lightning checkpoint: its 'state_dict' is a {type(state).__name__}, not "
                          "a mapping of names to tensors; pass a .ckpt file saved by 'spherinator fit'")  # fmt: skip
    if hparams is not None and not isinstance(hparams, dict):
        raise ExportError(f"'{path}' is not a Lightning checkpoint: its 'hyper_parameters' is a "
                          f"{type(hparams).__name__}, not a mapping; pass a .ckpt file saved by "
                          "'spherinator fit'")  # fmt: skip
    return ckpt


# How torch names the Python object a weights-only load refused: an unknown global, or one of a module it blocks
# outright (os, sys, posix: torch 2.14 words these "unsupported GLOBAL posix.system whose module posix is blocked").
_REFUSED_GLOBAL = (
    re.compile(r"Unsupported global: GLOBAL (\S+)"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked", flags=re.IGNORECASE),
)


def _refusal_message(path: Path, text: str) -> str:
    """Why torch's weights-only load refused ``path`` (its message ``text``), and what to do, in one line."""
    for pattern in _REFUSED_GLOBAL:
        found = pattern.search(text)
        if found is not None:
            return _untrusted_message(path, found.group(1).rstrip("."))
    refusal = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, flags=re.DOTALL)
    reason = " ".join((refusal.group(1) if refusal else text).split())
    return (
        f"'{path}' is not a PyTorch checkpoint that torch can read weights-only ({_first_sentence(reason)}); pass a "
        ".ckpt file saved by 'spherinator fit' or Trainer.save_checkpoint, or --trust-checkpoint if you trust it"
    )


def _not_a_checkpoint(path: Path, err: BaseException) -> str:
    return (
        f"'{path}' is not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)}); pass a .ckpt file saved "
        "by 'spherinator fit' or Trainer.save_checkpoint"
    )


def _untrusted_message(path: Path, name: str) -> str:
    """Why a checkpoint that names the Python object ``name`` (a class, a function) is not read in full."""
    return (
        f"checkpoint '{path}' stores '{name}' beyond tensors and plain settings, and reading it in full would run "
        "code named by the file. A model built in Python stores its encoder/decoder modules in the hyper-parameters "
        "this way ('spherinator fit' stores class_path settings). If you trust the file, pass --trust-checkpoint "
        "(trust=True in export_onnx) to read it in full"
    )


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def _read_config(path: Path) -> tuple[str, dict[str, Any], str]:
    if not path.is_file():
        raise ExportError(f"config '{path}' does not exist; pass the config.yaml saved in the run's log directory")
    from spherinator.config import load_yaml

    try:
        text = path.read_text()
        cfg = load_yaml(text, f"config '{path}'")  # as fit reads it: a key given twice is refused
    except UnicodeDecodeError as err:
        raise ExportError(f"config '{path}' is not a text file ({err}); pass the run's config.yaml") from err
    except ConfigError as err:
        raise ExportError(_first_line(err)) from err
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict) or "class_path" not in model_cfg:
        found = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise ExportError(
            f"config '{path}' has no 'model' section with a class_path (top-level keys: {found}); pass the "
            "config.yaml that training saved in its log directory"
        )
    return model_cfg["class_path"], dict(model_cfg.get("init_args") or {}), text


def build_model(class_path: str, init_args: dict[str, Any], source: str = "the given arguments") -> nn.Module:
    """Build a LightningModule from its ``class_path`` and ``init_args`` (nested class_path dicts included).

    jsonargparse resolves the encoder, decoder and loss exactly as ``spherinator fit`` does.

    Raises:
        ExportError: naming ``source`` when the class cannot be built from these arguments.
    """
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", fail_untyped=False, required=True)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    try:
        cfg = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
        return instantiate(cfg).model
    except Exception as err:
        raise ExportError(f"could not build {class_path} from {source}: {_root_cause(err)}") from err


def _instantiate_python_hparams(hparams: dict[str, Any], ckpt_path: Path) -> tuple[nn.Module, str]:
    """Rebuild a model whose checkpoint was saved from Python: no class path, the init arguments themselves."""
    import lightning.pytorch as pl

    import spherinator.models as models

    if not hparams:
        raise ExportError(
            f"checkpoint '{ckpt_path}' stores no hyper-parameters, so its model cannot be rebuilt; pass the run's "
            "config.yaml as config (--config)"
        )
    keys = set(hparams)
    candidates = []
    for name in getattr(models, "__all__", dir(models)):
        cls = getattr(models, name, None)
        if isinstance(cls, type) and issubclass(cls, pl.LightningModule):
            params = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
            if params == keys:
                candidates.append((cls, f"{models.__name__}.{name}"))  # the public name configs use
    if len(candidates) != 1:
        raise ExportError(
            f"checkpoint '{ckpt_path}' has no model class path and its hyper-parameters {sorted(keys)} match "
            f"{len(candidates)} spherinator model classes; pass the run's config.yaml as config (--config)"
        )
    cls, class_path = candidates[0]
    try:
        model = cls(**hparams)
    except Exception as err:
        raise ExportError(f"could not build {cls.__name__} from checkpoint '{ckpt_path}': {_root_cause(err)}") from err
    return model, class_path


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], ckpt_path: Path, source: str) -> None:
    """Load ``state_dict`` strictly; a mismatch is one line naming the keys. Missing and unexpected keys are those
    left after the model's load hooks, which fill in keys of older checkpoints (the centred sphere head)."""
    expected = model.state_dict()
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict
        and not isinstance(v, nn.parameter.UninitializedParameter)
        and tuple(v.shape) != tuple(state_dict[k].shape)
    ]
    missing = unexpected = []
    if not mismatched:
        keys = model.load_state_dict(dict(state_dict), strict=False)
        missing, unexpected = sorted(keys.missing_keys), sorted(keys.unexpected_keys)
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape checkpoint vs model", mismatched),
        ):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise ExportError(
            f"checkpoint '{ckpt_path}' does not match the model built from {source}: {'; '.join(parts)}. "
            "Pass the config.yaml saved with this checkpoint's run, or no config to use the checkpoint's own"
        )


def _check_model_contract(model: nn.Module, class_path: str) -> None:
    missing = [attr for attr in ("encode", "decode", "z_dim", "input_dim") if not hasattr(model, attr)]
    if missing:
        raise ExportError(
            f"{class_path} lacks {', '.join(missing)}; ONNX export needs a spherinator model "
            "(spherinator.models.Autoencoder or VariationalAutoencoder)"
        )


def _plain(value: Any) -> Any:
    """Hyper-parameters as YAML-safe data; modules and classes become their repr / import path."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _root_cause(err: BaseException, limit: int = 400) -> str:
    """The innermost error of ``err``'s chain (what a class refused, under jsonargparse's wrapping), on one line."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
