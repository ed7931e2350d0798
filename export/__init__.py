"""Fornax export: ONNX graphs with KV cache, onnxruntime quantisation, parity checks (python -m export)."""
from .onnx_export import QUANTS, ExportError, export
from .verify import format_report, verify_export

__all__ = ["export", "verify_export", "format_report", "ExportError", "QUANTS"]
