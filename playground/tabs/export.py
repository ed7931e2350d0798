"""The Export tab: the loaded model to ONNX at fp32 / int8 / int4, the parity report, and a .zip to download."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from export.attach import PRECISIONS, attach_onnx, export_for, export_summary
from export.package import zip_export

from .. import render
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current
from .model import backend_dropdown


@user_errors
def export_model(precision: str, progress=gr.Progress()):
    """Export the loaded model to ONNX at `precision`; returns the report, a zip to download and the backends."""
    if precision not in PRECISIONS:
        raise refusal(f"pick a precision: {', '.join(PRECISIONS)}")
    quant = PRECISIONS[precision]
    with current.using() as handle:
        folder = export_for(handle, quant, progress=lambda f, m: progress(0.9 * f, desc=m))
        name = attach_onnx(handle, quant)
    progress(0.92, desc="packing the download")
    archive = zip_export(folder, Path(tempfile.gettempdir()) / "fornax-exports" / folder.name,
                         f"{current.info()['name']}-onnx-{precision}")
    report = render.export_report(export_summary(folder), precision, str(folder), render.BACKEND_LABELS[name])
    info = current.info()
    return report, str(archive), backend_dropdown(info, name), render.model_card(info)


def build(backend_name: gr.Dropdown, card: gr.HTML) -> None:
    """The tab's components and events; an export adds its backend to the panel's `backend_name` and the `card`."""
    gr.Markdown("Export the loaded model to **ONNX** for ONNX Runtime: one graph with a KV cache that optimum's "
                "`ORTModelForCausalLM` and any ONNX Runtime client can run. int8 and int4 quantise the weights "
                "(onnxruntime's MatMulNBits): smaller and faster on a CPU, a little less exact — the parity report "
                "says how much. The export is checked against the PyTorch model and added to the Backend selector.")
    with gr.Row(equal_height=True):
        precision = gr.Radio(list(PRECISIONS), value="int8", label="Precision", scale=3, elem_id="fx-precision")
        export_button = gr.Button("Export to ONNX", variant="primary", scale=1, elem_id="fx-export")
    export_report = gr.Markdown("", elem_id="fx-export-report")
    export_file = gr.File(label="Download (.zip)", interactive=False, elem_id="fx-export-file")
    export_button.click(export_model, precision, [export_report, export_file, backend_name, card], api_name="export",
                        **MODEL_EVENTS)
