"""A SAM image encoder on onnxruntime (labels.sam.runtime onnx): the one part of SAM worth moving.

The image encoder is nearly all of SAM's time per frame at 1024^2 on 2 CPU cores (measured on this project's
2-core machine: MobileSAM 2.7 s in torch, 1.5 s in onnxruntime, 1.8x; vit_b ~20 s a whole frame in torch). The prompt encoder and mask
decoder stay in torch. Single-tensor encoders only (segment-anything's vit_*, ultralytics' MobileSAM and
SAM): SAM 2's returns a multi-scale dict. Each weights file is exported once per input size (labels.sam.image_size:
the export's input is fixed), checked against torch on a random input, and cached atomically under
labels.cache_dir; later runs, and every labelling worker, load the cached file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch

from charseg.config import SAM_IMAGE_SIZE
from charseg.device import ORT_CPU
from charseg.errors import CharsegError
from charseg.io import write_bytes_atomic
from charseg.ort import DEFAULT_OPSET, ort_session

INPUT_NAME, OUTPUT_NAME = "image", "embedding"
# Embeddings are O(1); the two runtimes' float32 kernels differ by ~1e-5 on them. An export that is off
# by more is broken, not rounded.
TOLERANCE = 1e-3


class OnnxImageEncoder(torch.nn.Module):
    """Drop-in for a SAM model's `image_encoder`: (1, 3, S, S) in, the embedding out, on onnxruntime.
    Keeps the torch encoder's `img_size`, which the predictors read."""

    def __init__(self, session: ort.InferenceSession, img_size: int, path: Path):
        super().__init__()
        self.session, self.img_size, self.path = session, img_size, path

    def set_imgsz(self, imgsz: Sequence[int]) -> None:
        """ultralytics' predictor sets the model's input size before every frame (SAMModel.set_imgsz passes it
        on here): the export's size is fixed, so only that size is accepted, never a silently wrong one."""
        if tuple(imgsz) != (self.img_size, self.img_size):
            raise CharsegError(f"the ONNX SAM image encoder {self.path.name} was exported for {self.img_size}^2 "
                               f"input, not {list(imgsz)}: labels.sam.image_size and the export must match")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: image.detach().float().cpu().numpy()}
        embedding = self.session.run([OUTPUT_NAME], feed)[0]
        return torch.from_numpy(embedding).to(device=image.device, dtype=image.dtype)


def onnx_image_encoder(encoder: torch.nn.Module, path: Path, providers: Sequence[Any] | None) -> OnnxImageEncoder:
    """The encoder on onnxruntime from the cached export at `path`, exporting it first when absent (or
    damaged: the cache is always safe to rebuild). `providers`: charseg.device.ort_providers (None: ORT's)."""
    providers = list(providers or ort.get_available_providers())
    # As many threads as torch has: a labelling worker's share of the cores, not every core per worker.
    threads = torch.get_num_threads()
    # The torch encoder's own size: an ultralytics model's after its set_imgsz (labels.sam.image_size).
    img_size = int(getattr(encoder, "img_size", SAM_IMAGE_SIZE))
    if path.is_file():
        try:
            session = ort_session(str(path), providers, threads)
            # The file name carries the size; a file of another size (renamed by hand) is foreign all the same.
            if session.get_inputs()[0].shape == [1, 3, img_size, img_size]:
                return OnnxImageEncoder(session, img_size, path)
        except Exception:  # ORT's own exception types: a truncated or foreign file is rebuilt below
            pass
    data, difference = export_encoder(encoder.eval(), img_size)
    print(f"masks: exported the SAM image encoder to {path} (onnxruntime vs torch: max |difference| "
          f"{difference:.2g})")
    write_bytes_atomic(path, data)
    return OnnxImageEncoder(ort_session(data, providers, threads), img_size, path)


def export_encoder(encoder: torch.nn.Module, img_size: int = SAM_IMAGE_SIZE,
                   tolerance: float = TOLERANCE) -> tuple[bytes, float]:
    """The encoder as single-file ONNX bytes (opset DEFAULT_OPSET, input (1, 3, S, S)) and its max |difference|
    from torch on a random input; raises CharsegError when the export fails or misses the tolerance."""
    encoder = encoder.float().cpu().eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, img_size, img_size, generator=generator)
    try:
        with torch.no_grad():
            program = torch.onnx.export(encoder, (example,), dynamo=True, opset_version=DEFAULT_OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    except torch.onnx.OnnxExporterError as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CharsegError(f"ONNX export of the SAM image encoder failed ({first}): set labels.sam.runtime: "
                           f"torch") from err
    proto = program.model_proto
    if proto.ByteSize() >= 2**31 - 1:  # vit_h: beyond protobuf's single-file cap
        raise CharsegError("the SAM image encoder is too large for a single-file ONNX (>= 2 GB, vit_h): set "
                           "labels.sam.runtime: torch")
    data = proto.SerializeToString()
    check = torch.randn(1, 3, img_size, img_size, generator=generator)
    with torch.no_grad():
        expected = encoder(check).numpy()
    got = ort_session(data, [ORT_CPU], None).run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0]
    difference = float(np.abs(got.astype(np.float64) - expected).max()) if got.shape == expected.shape \
        else float("inf")
    if not difference <= tolerance:  # written this way so that NaN fails too
        raise CharsegError(f"the ONNX export of the SAM image encoder differs from torch by {difference:.3g} "
                           f"(> {tolerance:g}): set labels.sam.runtime: torch")
    return data, difference
