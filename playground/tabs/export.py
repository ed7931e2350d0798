"""The Export tab: the loaded model to ONNX at fp32 / int8 / int4 (encoders and LSTMs: fp32 / int8), the parity
report, and a .zip to download."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import gradio as gr

from export.attach import PRECISIONS, attach_onnx, export_for, export_summary, precisions_for
from export.package import zip_export

from .. import deployment, render
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current
from .model import backend_dropdown


@user_errors
def export_model(precision: str, progress=gr.Progress(), request: gr.Request = None):
    """Export the loaded model to ONNX at `precision`; returns the report, a zip to download and the backends.
    Public mode: only a model that is everyone's (default, a Hub id) or the visitor's own; the download is served
    to that visitor only, and the report names no server folder."""
    if precision not in PRECISIONS:
        raise refusal(f"pick a precision: {', '.join(PRECISIONS)}")
    quant = PRECISIONS[precision]
    deployment.check_export(current.loaded_by, request)
    with current.using() as handle:
        offered = precisions_for(handle.family.quants)
        if precision not in offered:
            raise refusal(f"{precision} is not offered for {handle.family.described}; pick {', '.join(offered)}")
        folder = export_for(handle, quant, progress=lambda f, m: progress(0.9 * f, desc=m))
        name = attach_onnx(handle, quant)
    progress(0.92, desc="packing the download")
    visitor = hashlib.sha256(deployment.visitor_id(request).encode()).hexdigest()[:16]
    archive = zip_export(folder, Path(tempfile.gettempdir()) / "fornax-exports" / f"{folder.name}-{visitor}",
                         f"{current.info()['name']}-onnx-{precision}")
    shown_folder = f"the server's export cache ({folder.name})" if deployment.public() else str(folder)
    report = render.export_report(export_summary(folder), precision, shown_folder, render.BACKEND_LABELS[name])
    info = current.info()
    return report, served_download(archive, request), backend_dropdown(info, name), render.model_card(info)


def served_download(archive: Path, request: gr.Request | None) -> str:
    """The download's copy in Gradio's cache (where it is served from: Gradio names it by content hash and would
    copy it there anyway), registered as this visitor's (public mode: served to nobody else)."""
    if not deployment.public():
        return str(archive)
    from gradio.processing_utils import save_file_to_cache
    from gradio.utils import get_upload_folder

    served = save_file_to_cache(archive, get_upload_folder())
    deployment.own_file(request, served)
    return served


def fit_precisions(precision: str | None) -> gr.Radio:
    """The precisions offered for the loaded model's family (the choice kept when it is still offered)."""
    info = current.info()
    choices = precisions_for(render.capabilities(info)["quants"]) if info else list(PRECISIONS)
    return gr.Radio(choices=choices, value=precision if precision in choices else choices[-1])


def build(runner_name: gr.Dropdown, card: gr.HTML) -> None:
    """The tab's components and events; an export adds its backend to the panel's `runner_name` and the `card`."""
    gr.Markdown("Export the loaded model to **ONNX** for ONNX Runtime: one graph with a KV cache that optimum's "
                "`ORTModelForCausalLM` and any ONNX Runtime client can run. int8 and int4 quantise the weights "
                "(onnxruntime's MatMulNBits): smaller and faster on a CPU, a little less exact — the parity report "
                "says how much. The export is checked against the PyTorch model and added to the Backend selector. "
                "An encoder (BERT) exports in the layout of optimum's `ORTModelForMaskedLM` / "
                "`ORTModelForSequenceClassification`, an LSTM with its state as graph inputs and outputs; "
                "both at fp32 or int8.")
    with gr.Row(equal_height=True):
        precision = gr.Radio(list(PRECISIONS), value="int8", label="Precision", scale=3, elem_id="fx-precision")
        export_button = gr.Button("Export to ONNX", variant="primary", scale=1, elem_id="fx-export")
    export_report = gr.Markdown("", elem_id="fx-export-report")
    export_file = gr.File(label="Download (.zip)", interactive=False, elem_id="fx-export-file")
    export_button.click(export_model, precision, [export_report, export_file, runner_name, card], api_name="export",
                        **MODEL_EVENTS)
    card.change(fit_precisions, precision, precision, api_visibility="private", queue=False)  # a model was loaded
