"""The encoder and decoder an atlas runs: from a run directory, a checkpoint or an ONNX export directory.

A run directory (``spherinator fit``'s ``runs/<name>/version_N`` or a ``spherinator-submit`` task) decodes through
its ``onnx/decoder.onnx`` with onnxruntime when it has one, and encodes with its checkpoint in torch, which also
gives the VAE's concentration; a checkpoint alone runs both in torch; an ONNX export directory runs both in
onnxruntime (no concentration: ``encoder.onnx`` outputs the location only). torch is imported only for a
checkpoint or a ``device`` given.

ONNX files without spherinator's metadata (upstream Spherinator's exports) are read from their graphs: the
decoder's one input gives z_dim, its output on zeros the sample shape; the inputs may have other names (upstream
0.5.1 calls both ``x``) and an encoder with two outputs gives (location, scale).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spherinator.atlas import AtlasError, NotASphereError
from spherinator.atlas.decoders import session_options
from spherinator.runs import open_run


@dataclass
class SphereModel:
    """What the atlas needs of a trained model.

    Attributes:
        input_shape: Shape of one sample, e.g. (3, 128, 128).
        z_dim: Latent size (3: the sphere S^2).
        name: A short name for titles (the run directory's name).
        checkpoint: The checkpoint encoding runs from, if any.
        onnx_dir: The ONNX export directory decoding (and maybe encoding) runs from, if any.
        config: The run's ``config.yaml`` (the data config used when no -c is given), if found.
        model_class: Import path of the model class.
        device: Torch device of the checkpoint's model (a ``torch.device``; ``"cpu"`` without a checkpoint).
    """

    input_shape: tuple[int, ...]
    z_dim: int
    name: str
    checkpoint: Path | None = None
    onnx_dir: Path | None = None
    config: Path | None = None
    model_class: str = ""
    device: Any = "cpu"
    torch_model: Any = None
    decoder_session: Any = None
    encoder_session: Any = None
    decoder_input: str = "z"
    encoder_input: str = "x"

    @property
    def decoder_source(self) -> str:
        if self.decoder_session is not None:
            return f"{self.onnx_dir / 'decoder.onnx'} (onnxruntime)"
        return f"{self.checkpoint} (torch, {self.device})"

    @property
    def encoder_source(self) -> str:
        if self.torch_model is not None:
            return f"{self.checkpoint} (torch, {self.device})"
        return f"{self.onnx_dir / 'encoder.onnx'} (onnxruntime)"

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(B, z_dim) float32 -> (B, *input_shape) float32 decoder outputs."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        if self.decoder_session is not None:
            return self.decoder_session.run(None, {self.decoder_input: z})[0]
        import torch

        with torch.no_grad():
            return self.torch_model.decode(torch.from_numpy(z).to(self.device)).float().cpu().numpy()

    def encode(self, batch: Any) -> dict[str, np.ndarray]:
        """A data batch (array, tensor or dict, model input first) -> ``location`` (B, z_dim) and, with a torch VAE,
        ``scale`` (B,), the Power Spherical concentration."""
        x = batch_input(batch)
        if self.torch_model is None:
            outs = self.encoder_session.run(None, {self.encoder_input: np.ascontiguousarray(x, np.float32)})
            if len(outs) == 2:  # upstream's encoder.onnx: (location, scale (B, 1))
                return {"location": outs[0], "scale": outs[1].reshape(len(outs[1]))}
            return {"location": outs[0]}
        import torch

        with torch.no_grad():
            out = self.torch_model.predict_step(x.to(self.device), 0)
        if isinstance(out, torch.Tensor):
            out = {"location": out}
        return {k: v.float().cpu().numpy() for k, v in out.items() if k in ("location", "scale")}

    def worker_decoder(self) -> Any:
        """A picklable ``decode`` for a worker process (its own session or model copy, on one thread), or None
        where workers do not help (a model on a GPU)."""
        from spherinator.atlas.decoders import OnnxDecoder, TorchDecoder

        if self.decoder_session is not None:
            return OnnxDecoder(str(self.onnx_dir / "decoder.onnx"), self.decoder_input)
        if str(self.device) == "cpu":
            return TorchDecoder(self.torch_model)
        return None


def batch_input(batch: Any) -> Any:
    """The model input of a batch: the first entry of a dict (numpy arrays from
    :class:`~spherinator.atlas.source.ParquetRows`, tensors from a DataModule), an array itself, else what
    :func:`~spherinator.models.autoencoder.model_input` takes of it (torch is imported only then)."""
    if isinstance(batch, dict):
        return next(iter(batch.values()))
    if isinstance(batch, np.ndarray):
        return batch
    from spherinator.models.autoencoder import model_input

    return model_input(batch)


def open_model(path: str | Path, device: str | None = None, trust: bool = False) -> SphereModel:
    """The model of a run directory, a ``.ckpt`` file or an ONNX export directory (see the module docstring).

    Raises:
        AtlasError: nothing usable at ``path``, a model whose latent is not 3-d, an unreadable checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise AtlasError(f"'{path}' does not exist; give a run directory, a .ckpt file or an ONNX export directory")
    if path.is_file() and path.suffix != ".ckpt":
        raise AtlasError(f"'{path}' is a file but not a .ckpt checkpoint; give a run directory, a .ckpt file or an "
                         "ONNX export directory")  # fmt: skip
    run = open_run(path)
    run_dir, checkpoint, onnx_dir, config = run.run_dir, run.checkpoint, run.onnx_dir, run.config
    target = torch_device(device) if device is not None or checkpoint is not None else "cpu"
    if checkpoint is None and onnx_dir is None:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise AtlasError(
            f"'{path}' holds no checkpoints/*.ckpt that loads, onnx/decoder.onnx or decoder.onnx (found: {found}); "
            "give a run directory (runs/<name>/version_<n>, a spherinator-submit task), a .ckpt file or an ONNX "
            "export directory"
        )
    named = (run_dir or path).resolve()
    name = f"{named.parent.name}/{named.name}" if re.fullmatch(r"version_\d+", named.name) else named.name
    model = SphereModel(input_shape=(), z_dim=0, name=name, checkpoint=checkpoint, onnx_dir=onnx_dir, config=config,
                        device=target)  # fmt: skip
    if onnx_dir is not None:
        _open_onnx(model, onnx_dir, encoder=checkpoint is None)
    if checkpoint is not None:
        _open_checkpoint(model, checkpoint, trust)
    if model.z_dim != 3:
        raise NotASphereError(
            f"{model.model_class or 'the model'} has a {model.z_dim}-d latent space; the atlas maps the sphere S^2, "
            "so it needs z_dim 3 (train with --model.init_args.z_dim 3)"
        )
    return model


def torch_device(device: str | None) -> Any:
    """The torch device ``device`` names (None: cuda if available, else cpu).

    Raises:
        AtlasError: not a device name, or a CUDA device this machine does not have.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as err:
        raise AtlasError(f"--device {device!r} is not a torch device; give cpu, cuda or cuda:N") from err
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (target.index or 0) >= count:
            raise AtlasError(f"--device {device}: this machine has {count} CUDA device(s); give cpu"
                             + (f" or cuda:0..{count - 1}" if count else ""))  # fmt: skip
    return target


def _open_onnx(model: SphereModel, onnx_dir: Path, encoder: bool) -> None:
    import onnxruntime as ort

    def session(name: str) -> Any:
        file = onnx_dir / f"{name}.onnx"
        if not file.is_file():
            raise AtlasError(f"'{onnx_dir}' has no {name}.onnx; export the model with 'spherinator export'")
        try:
            return ort.InferenceSession(str(file), session_options(), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise AtlasError(f"onnxruntime cannot load '{file}': {err}") from err

    model.decoder_session = session("decoder")
    meta = model.decoder_session.get_modelmeta().custom_metadata_map
    inputs = model.decoder_session.get_inputs()
    ours = "input_shape" in meta or "z_dim" in meta
    if [i.name for i in inputs] != ["z"] and (ours or len(inputs) != 1):
        raise AtlasError(f"'{onnx_dir / 'decoder.onnx'}' takes {[i.name for i in inputs]}; a spherinator decoder "
                         "takes one input 'z'")  # fmt: skip
    if ours:
        try:
            model.input_shape = tuple(json.loads(meta["input_shape"]))
            model.z_dim = int(meta["z_dim"])
        except (KeyError, ValueError) as err:
            raise AtlasError(f"'{onnx_dir / 'decoder.onnx'}' has broken input_shape/z_dim metadata; export it "
                             "again with 'spherinator export'") from err  # fmt: skip
    else:  # an export without our metadata (upstream Spherinator's): its graph says both
        model.decoder_input = inputs[0].name
        model.z_dim, model.input_shape = _shapes_from_graph(onnx_dir / "decoder.onnx", model.decoder_session)
    model.model_class = meta.get("model_class", "")
    _try_graph(onnx_dir / "decoder.onnx", model.decoder_session, model.decoder_input, (model.z_dim,),
               model.input_shape)  # fmt: skip
    if encoder:
        model.encoder_session = session("encoder")
        if not ours and len(model.encoder_session.get_inputs()) == 1:
            model.encoder_input = model.encoder_session.get_inputs()[0].name
        _try_graph(onnx_dir / "encoder.onnx", model.encoder_session, model.encoder_input, model.input_shape,
                   (model.z_dim,))  # fmt: skip


def _shapes_from_graph(file: Path, session: Any) -> tuple[int, tuple[int, ...]]:
    """z_dim and the sample shape of a decoder graph without metadata: its input (batch, z_dim), and its output on
    one latent of zeros."""
    (declared,) = session.get_inputs()
    z_dim = declared.shape[-1] if len(declared.shape) == 2 else None
    if not isinstance(z_dim, int) or z_dim <= 0:
        raise AtlasError(f"'{file}' has no spherinator metadata and its input {declared.name!r} has shape "
                         f"{declared.shape}, not (batch, z_dim); export it with 'spherinator export'")  # fmt: skip
    try:
        out = session.run(None, {declared.name: np.zeros((1, z_dim), dtype=np.float32)})[0]
    except Exception as err:  # onnxruntime's own error classes
        raise AtlasError(f"'{file}' (no spherinator metadata) fails on a latent of shape (1, {z_dim}): "
                         f"{' '.join(str(err).split())[:300]}") from err  # fmt: skip
    return z_dim, tuple(int(d) for d in np.shape(out)[1:])


def _try_graph(file: Path, session: Any, name: str, takes: tuple[int, ...], gives: tuple[int, ...]) -> None:
    """Run ``session`` once on zeros of shape (1, *takes) and check that it takes one input ``name`` and gives
    (1, *gives): a graph that is not the export of this model (its metadata say otherwise) is named here, not
    met as a traceback while drawing."""
    inputs = [i.name for i in session.get_inputs()]
    if inputs != [name]:
        raise AtlasError(f"'{file}' takes {inputs}; spherinator's {file.stem} takes one input {name!r}; export the "
                         "model with 'spherinator export'")  # fmt: skip
    try:
        out = session.run(None, {name: np.zeros((1, *takes), dtype=np.float32)})[0]
    except Exception as err:  # onnxruntime's own error classes: a graph that does not fit its metadata
        reason = " ".join(str(err).split())[:300]
        raise AtlasError(f"'{file}' fails on {name} of shape {(1, *takes)} (the shape its export metadata give): "
                         f"{reason}; export the model again with 'spherinator export'") from err  # fmt: skip
    if tuple(np.shape(out)) != (1, *gives):
        raise AtlasError(f"'{file}' gives shape {tuple(np.shape(out))[1:]} per sample where its export metadata "
                         f"say {gives}; export the model again with 'spherinator export'")  # fmt: skip


def _open_checkpoint(model: SphereModel, checkpoint: Path, trust: bool) -> None:
    from spherinator.export import ExportError, load_model

    try:
        loaded = load_model(checkpoint, config=model.config, trust=trust)
    except ExportError as err:
        raise AtlasError(str(err)) from err
    net = loaded.model.to(model.device).eval()
    if net.input_dim is None or net.z_dim is None:
        raise AtlasError(f"{loaded.class_path} from '{checkpoint}' does not know its input shape or latent size; "
                         "give the run directory (with its config.yaml) instead")  # fmt: skip
    shape, z_dim = tuple(int(d) for d in net.input_dim), int(net.z_dim)
    if model.decoder_session is not None and (shape, z_dim) != (model.input_shape, model.z_dim):
        raise AtlasError(
            f"'{checkpoint}' (input {list(shape)}, z_dim {z_dim}) is not the model of '{model.onnx_dir}' (input "
            f"{list(model.input_shape)}, z_dim {model.z_dim}); export it again or give the ONNX directory alone"
        )
    model.input_shape, model.z_dim, model.model_class = shape, z_dim, loaded.class_path
    model.torch_model = net
