"""onnxruntime sessions and the ONNX opset charseg exports at: shared by the model export (charseg.onnx) and
the masks stage's SAM encoder export (charseg.labels.encoder_onnx), which must not depend on model code."""
from __future__ import annotations

from typing import Any, Sequence

import onnxruntime as ort

# The exporter's native opset in torch 2.14; pinned so that a torch upgrade does not silently change
# which runtimes can load the files; --opset 18 for runtimes that stop there.
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's oldest; below it, torch writes 18 anyway after a failed conversion


def ort_session(model: str | bytes, providers: Sequence[Any], threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's provider-assignment warnings are noise here
    if threads:
        options.intra_op_num_threads = threads  # None/0: ORT's default, one thread per physical core
    return ort.InferenceSession(model, sess_options=options, providers=list(providers))
