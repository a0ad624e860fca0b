"""Set, cap or freeze a model's parameters by name (upstream Spherinator's ``ParamManager``, same options)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from spherinator.errors import ConfigError


@dataclass
class ParamConfig:
    """What to do with the parameters whose names match ``pattern``.

    Args:
        pattern: A regular expression searched in each parameter name (``model.named_parameters()``), e.g.
            ``encoder\\.fc_scale``.
        value: Fill the matched parameters with this number when training starts (None: leave them).
        max_value: Cap the matched parameters at this number when training starts and after every training batch
            (None: no cap).
        freeze: True stops the matched parameters from training (``requires_grad = False``), False makes them
            trainable; None (the default) leaves them as they are. Upstream's default False made every matched
            parameter trainable, so a cap (``max_value``) on a frozen parameter (``freeze: true`` on an encoder,
            ``fixed_scale``) unfroze it; write ``freeze: false`` where that is wanted.
    """

    pattern: str
    value: float | None = None
    max_value: float | None = None
    freeze: bool | None = None


class ParamManager(pl.Callback):
    """Applies a list of :class:`ParamConfig` to the model: values and freezing when training starts, the caps then
    and after each training batch. In YAML::

        trainer:
          callbacks:
            - class_path: spherinator.callbacks.ParamManager
              init_args:
                configs:
                  - {pattern: "encoder\\\\.fc_scale", max_value: 10.0}
                  - {pattern: "^encoder\\\\.", freeze: true}

    A pattern that matches no parameter is reported once (a misspelt name would otherwise do nothing silently).
    """

    def __init__(self, configs: list[ParamConfig]) -> None:
        super().__init__()
        self.configs = [c if isinstance(c, ParamConfig) else ParamConfig(**c) for c in configs]
        self._patterns = []
        for conf in self.configs:
            try:
                self._patterns.append(re.compile(conf.pattern))
            except re.error as err:
                raise ConfigError(f"ParamManager: pattern {conf.pattern!r} is not a regular expression ({err}); "
                                  "escape dots as \\\\. in YAML, e.g. 'encoder\\\\.fc_scale'") from err  # fmt: skip
            for name in ("value", "max_value"):
                number = getattr(conf, name)
                if number is not None and not math.isfinite(number):
                    raise ConfigError(f"ParamManager: {name} {number} for {conf.pattern!r} must be a finite number")

    def _matched(self, pl_module: pl.LightningModule) -> list[tuple[ParamConfig, list[tuple[str, torch.nn.Parameter]]]]:
        named = list(pl_module.named_parameters())
        return [
            (c, [(n, p) for n, p in named if pattern.search(n)])
            for c, pattern in zip(self.configs, self._patterns, strict=True)
        ]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for conf, params in self._matched(pl_module):
            if not params:
                rank_zero_warn(f"ParamManager: pattern {conf.pattern!r} matches no parameter of "
                               f"{type(pl_module).__name__}; see model.named_parameters() for the names")  # fmt: skip
            with torch.no_grad():
                for _, param in params:
                    if conf.value is not None:
                        param.fill_(conf.value)
                    if conf.max_value is not None:
                        param.clamp_(max=conf.max_value)
                    if conf.freeze is not None:
                        param.requires_grad_(not conf.freeze)
            if params:
                what = ", ".join(n for n, _ in params[:4]) + (f" (+{len(params) - 4} more)" if len(params) > 4 else "")
                state = {True: "frozen", False: "trainable", None: "training as before"}[conf.freeze]
                rank_zero_info(f"ParamManager: {what}: {state}"
                               + (f", set to {conf.value}" if conf.value is not None else "")
                               + (f", capped at {conf.max_value}" if conf.max_value is not None else ""))  # fmt: skip

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        with torch.no_grad():
            for conf, params in self._matched(pl_module):
                if conf.max_value is not None:
                    for _, param in params:
                        param.clamp_(max=conf.max_value)


__all__ = ["ParamConfig", "ParamManager"]
