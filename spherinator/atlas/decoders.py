"""Decoders a tile worker process runs (:meth:`~spherinator.atlas.model.SphereModel.worker_decoder`): picklable,
each opening its own session on one thread, and importing neither torch (for ONNX) nor the run machinery, so a
spawned worker starts in well under a second."""

from __future__ import annotations

from typing import Any

import numpy as np


def session_options() -> Any:
    """onnxruntime's options for the atlas's sessions: no CPU memory arena. The arena keeps the largest batch's
    activations for the life of the session (0.1-0.2 GB per session for a 3x128x128 decoder at batch 64, in every
    worker); without it they are returned after each batch, at no measurable cost in time here."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    return options


class OnnxDecoder:
    """``decoder.onnx`` run by onnxruntime on one thread, its session opened at the first call (in the worker)."""

    def __init__(self, path: str, input_name: str = "z") -> None:
        self.path, self.input_name, self._session = path, input_name, None  # upstream 0.5.1's input is "x"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "input_name": self.input_name, "_session": None}

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if self._session is None:
            import onnxruntime as ort

            options = session_options()
            options.intra_op_num_threads = options.inter_op_num_threads = 1  # one worker per core
            self._session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        (out,) = self._session.run(None, {self.input_name: np.ascontiguousarray(z, dtype=np.float32)})
        return out


class TorchDecoder:
    """A torch model's decoder on the CPU, on one thread."""

    def __init__(self, net: Any) -> None:
        self.net = net

    def __call__(self, z: np.ndarray) -> np.ndarray:
        import torch

        torch.set_num_threads(1)  # one worker per core
        with torch.no_grad():
            return self.net.decode(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))).float().numpy()
