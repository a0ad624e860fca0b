"""spherinator: autoencoders with a spherical latent space, trained on HPC clusters."""

from spherinator.version import __version__

__all__ = ["__version__", "export_onnx"]


def __getattr__(name: str):
    # ONNX export pulls in onnx/onnxruntime: import it only when asked for.
    if name == "export_onnx":
        from spherinator.export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'spherinator' has no attribute {name!r}")
