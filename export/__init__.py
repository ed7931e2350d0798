"""Fornax export: owns turning a backend model into something to ship — ONNX graphs with KV cache (encoders in
optimum's layout, the LSTM with its state as inputs/outputs), onnxruntime and GGUF-block quantisation, parity
checks, the export cache and zip packaging (`python -m export`)."""
from .onnx_export import QUANTS, ExportError, export
from .package import zip_export
from .verify import format_report, verify_export

__all__ = ["export", "verify_export", "format_report", "zip_export", "ExportError", "QUANTS"]
