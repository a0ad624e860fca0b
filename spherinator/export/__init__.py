"""ONNX export of trained spherinator models, validated against torch with onnxruntime."""

from spherinator.export.checkpoint import ExportError, LoadedModel, build_model, load_model
from spherinator.export.cli import main
from spherinator.export.onnx_export import GRAPHS, REPORT_NAME, ValidationError, export_onnx, validate_graph

__all__ = [
    "GRAPHS",
    "REPORT_NAME",
    "ExportError",
    "LoadedModel",
    "ValidationError",
    "build_model",
    "export_onnx",
    "load_model",
    "main",
    "validate_graph",
]
