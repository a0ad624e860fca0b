"""Transfer learning on any encoder or decoder: start it from saved weights (``weights``) and fix them (``freeze``).

``weights`` is what upstream Spherinator's configs write: a path (a Lightning checkpoint or a plain state dict), or a
:class:`WeightsProvider` (upstream's class: a checkpoint's ``state_dict`` with a ``prefix`` cut off). A path without a
prefix finds the part of the file that fits the module: the whole state dict, or the entries under the one prefix
(``encoder``, ``encoder.encoder``, ``decoder``, ...) whose names are exactly the module's.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spherinator.errors import ConfigError


def _read_state_dict(path: str | Path, owner: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: a checkpoint's ``state_dict`` or a plain state dict, read weights-only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{owner}: weights file {str(path)!r} does not exist; give the path of a checkpoint (.ckpt) or state "
            "dict (.pt), or weights: null"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on weights_only are no concern of the user's
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{owner}: weights file {str(path)!r} cannot be read as a checkpoint or state dict ({first})"
        ) from err
    state = content.get("state_dict", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"{owner}: weights file {str(path)!r} holds no state dict (a checkpoint's 'state_dict' or a mapping of "
            "names to tensors); save one with torch.save(module.state_dict(), path)"
        )
    return dict(state)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in state.items() if k.startswith(prefix + ".")}


class WeightsProvider:
    """Weights to start a module from: the ``state_dict`` of a checkpoint (or a plain state dict), optionally only
    the entries under ``prefix`` with it cut off. Upstream Spherinator's class, with the same arguments.

    Args:
        weight_path: Path of a Lightning checkpoint or of a file written by ``torch.save(module.state_dict())``.
        prefix: Keep only the entries named ``prefix.*``, without the prefix (e.g. ``encoder``); None keeps all.
    """

    def __init__(self, weight_path: str, prefix: str | None = None) -> None:
        self.weight_path = str(weight_path)
        self.prefix = prefix
        state = _read_state_dict(weight_path, "WeightsProvider")
        self.weights = state if prefix is None else _strip(state, prefix)
        if not self.weights:
            raise ConfigError(
                f"WeightsProvider: no entry of {self.weight_path!r} starts with prefix {prefix!r}; use one of "
                f"{_prefixes(state)[:8]} or prefix: null"
            )

    def get_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict to load (prefix removed)."""
        return self.weights


def _prefixes(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every dotted prefix of the names in ``state``, shortest first."""
    found: set[str] = set()
    for key in state:
        parts = key.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(found, key=lambda p: (p.count("."), p))


def _usable(state: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without the entries the module declares unused (``unused_weights``: name prefixes, e.g. upstream's
    ViT pooler, which its forward never calls)."""
    unused = tuple(getattr(module, "unused_weights", ()))
    return {k: v for k, v in state.items() if not (unused and k.startswith(unused))}


def _fitting_part(state: dict[str, torch.Tensor], module: nn.Module, source: str, owner: str) -> dict[str, Any]:
    """The whole of ``state`` when its names are the module's, else the entries under the one prefix that fits."""
    wanted = set(module.state_dict())
    if set(_usable(state, module)) == wanted:
        return _usable(state, module)
    fits = [p for p in _prefixes(state) if set(_usable(_strip(state, p), module)) == wanted]
    if len(fits) == 1:
        return _usable(_strip(state, fits[0]), module)
    if len(fits) > 1:
        raise ConfigError(
            f"{owner}: several parts of {source!r} fit ({', '.join(fits)}); name one with weights: {{class_path: "
            f"spherinator.models.WeightsProvider, init_args: {{weight_path: {source}, prefix: {fits[0]}}}}}"
        )
    example = sorted(wanted)[:3]
    raise ConfigError(
        f"{owner}: no part of {source!r} has this module's parameter names (e.g. {example}); the file was saved from "
        f"another architecture, or its prefix is not one of {_prefixes(state)[:8]}: give the module's own settings"
    )


def load_weights(module: nn.Module, weights: str | Path | WeightsProvider | None, owner: str | None = None) -> None:
    """Load ``weights`` (a path or a :class:`WeightsProvider`) into ``module``; names and shapes must all match.

    Raises:
        ConfigError: the file is missing or unreadable, holds no part that fits, or shapes differ.
    """
    if weights is None:
        return
    owner = owner or type(module).__name__
    if isinstance(weights, WeightsProvider):
        state, source = weights.get_state_dict(), weights.weight_path
        state = _fitting_part(state, module, source, owner) if weights.prefix is None else _usable(state, module)
    else:
        source = str(weights)
        state = _fitting_part(_read_state_dict(weights, owner), module, source, owner)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(
            f"{owner}: the weights in {source!r} do not fit this module ({detail[:300]}); give the settings the "
            "weights were trained with"
        ) from err


def freeze_module(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module`` (lazy ones keep the flag when they materialise).

    BatchNorm running statistics still follow the data in training mode, as upstream's ``freeze`` does.
    """
    for param in module.parameters():
        param.requires_grad = False  # not requires_grad_(): an uninitialised (lazy) parameter refuses that call


def apply_transfer(
    module: nn.Module, weights: str | Path | WeightsProvider | None, freeze: bool, frozen: nn.Module | None = None
) -> None:
    """Load ``weights`` into ``module``, then freeze ``frozen`` (default: the whole module) when ``freeze``."""
    load_weights(module, weights)
    if freeze:
        freeze_module(module if frozen is None else frozen)


def drop_weight_sources(config: Any) -> Any:
    """A copy of a hyperparameter tree whose encoder/decoder settings have ``weights`` None.

    A checkpoint holds the trained weights itself; rebuilding its model must not read (or need) the file the
    training started from. Only mappings with both ``weights`` and ``freeze`` are touched (the transfer settings of
    an encoder or decoder), so another class's ``weights`` argument (a loss's, say) stays.
    """
    if isinstance(config, Mapping):
        transfer = "weights" in config and "freeze" in config
        return {k: None if transfer and k == "weights" else drop_weight_sources(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return type(config)(drop_weight_sources(v) for v in config)
    return config
