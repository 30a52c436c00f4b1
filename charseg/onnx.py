"""ONNX export of a charseg model, and an ONNX Runtime segmenter that `charseg predict --onnx` runs.

The exported file is self-describing: the checkpoint metadata (model_name, arch, encoder, img_size, mean,
std, threshold, task, classes, ...) travels in its metadata_props under "charseg", so an .onnx file alone
rebuilds the preprocessing and knows its classes, with no params.yaml. Graph: input "image" (B, 3, S, S)
float32, normalised; output "logits" (B, C, S, S): C = 1 for the person task (sigmoid), one channel per class
of `classes` for the characters task (softmax); B is dynamic, S is the checkpoint's img_size.

OnnxSegmenter runs the model on onnxruntime instead of torch (often faster on the CPU, and the same
file serves other runtimes), but it is not torch-free: charseg's device policy (charseg.device) and
preprocessing (charseg.data) import torch, so `charseg predict --onnx` needs the same install as the
rest of charseg. A torch-free deployment needs only this file's graph and metadata contract:
resize to S x S, normalise with the metadata's mean/std, run, sigmoid (person) or softmax over the channels
(characters), resize back, threshold (person) or argmax (characters; class i is classes[i]).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch

from charseg.device import ORT_CPU, ORT_CUDA
from charseg.errors import CharsegError
from charseg.inference import logits_to_probabilities
from charseg.io import file_sha256, write_bytes_atomic
from charseg.layout import PROJECT
from charseg.ort import DEFAULT_OPSET, MIN_OPSET, ort_session
from charseg.task import Task, probabilities, task_of_checkpoint

METADATA_KEY = "charseg"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# Gate on probabilities, not logits: the two runtimes' float32 kernels differ by up to ~6e-4 on logits
# (unetpp at 512 px), a gap that grows with depth and size yet is harmless, while a probability off by
# < 1e-3 can only flip pixels whose probability is within 1e-3 of the threshold.
DEFAULT_TOLERANCE = 1e-3
# torch.export specialises a dimension whose example size is 1, so the example batch must be >= 2,
# and the parity check runs another batch size to prove the batch dimension really is dynamic.
EXAMPLE_BATCH = 2
CHECK_BATCH = 3


@dataclass(frozen=True)
class ExportReport:
    path: Path
    size_bytes: int
    opset: int
    check_batch: int
    max_abs_logits: float   # onnxruntime vs torch on the same random batch
    max_abs_probs: float    # the same after the sigmoid (person) or softmax (characters); what `tolerance` applies to
    tolerance: float


def export_onnx(model: torch.nn.Module, meta: dict[str, Any], path: str | Path, *, opset: int = DEFAULT_OPSET,
                tolerance: float = DEFAULT_TOLERANCE, source_checkpoint: str | Path | None = None) -> ExportReport:
    """Export `model` (put in eval mode) to a single-file ONNX at `path`, written only if onnxruntime's
    probabilities match torch's within `tolerance` on a random batch; raises CharsegError otherwise.

    `meta` is the checkpoint metadata from models.load_checkpoint; the sha256 of `source_checkpoint`
    is added to it so an .onnx file can be traced back to the exact checkpoint it came from, and its task and
    classes (charseg.task; an old checkpoint without them is a person-task one) so OnnxSegmenter knows them.
    """
    path = Path(path)
    size = int(meta["img_size"])
    name = meta.get("model_name", "model")
    if opset < MIN_OPSET:
        raise CharsegError(f"--opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or newer")
    task = task_of_checkpoint(meta)
    stored = {k: v for k, v in meta.items() if k not in ("format", "version")}  # the checkpoint file's markers
    stored.update(task=task.name, classes=list(task.classes))
    if source_checkpoint is not None:
        stored["checkpoint_sha256"] = file_sha256(source_checkpoint)

    model = model.eval()
    generator = torch.Generator().manual_seed(0)  # the example batch, then the check batch
    data = _onnx_bytes(model, stored, size, opset, name, generator)
    logits_diff, probs_diff = _parity(model, data, size, name, task, generator)
    if not probs_diff <= tolerance:  # written this way so that NaN fails too
        raise CharsegError(f"ONNX export of {name} failed the parity check on a batch of {CHECK_BATCH}: "
                           f"max |prob difference| {probs_diff:.3g} > tolerance {tolerance:g} (max |logit "
                           f"difference| {logits_diff:.3g}); nothing written to {path}: try another --opset, "
                           f"or a larger --tolerance if that difference is acceptable")
    write_bytes_atomic(path, data)
    return ExportReport(path=path, size_bytes=len(data), opset=opset, check_batch=CHECK_BATCH,
                        max_abs_logits=logits_diff, max_abs_probs=probs_diff, tolerance=tolerance)


def _onnx_bytes(model: torch.nn.Module, stored: dict[str, Any], size: int, opset: int, name: str,
                generator: torch.Generator) -> bytes:
    """The serialised single-file ONNX model at `opset`, dynamic batch, with `stored` as its charseg metadata."""
    device = next(model.parameters()).device
    example = torch.randn(EXAMPLE_BATCH, 3, size, size, generator=generator).to(device)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False)  # verbose=None prints a page of per-step progress lines
    except torch.onnx.OnnxExporterError as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CharsegError(f"ONNX export of {name} (opset {opset}) failed: {first}; "
                           f"try another --opset, or an encoder the exporter supports") from err
    proto = program.model_proto
    written = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if written != opset:
        raise CharsegError(f"the exporter could not convert {name} to opset {opset} (it wrote {written}): "
                           f"use --opset {written}")
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(stored, default=str))
    # One self-contained file: fine below protobuf's 2 GB cap (these models are 10-110 MB); beyond it
    # the weights would need external data files, which charseg does not ship.
    if proto.ByteSize() >= 2**31 - 1:
        raise CharsegError(f"{name} is too large for a single-file ONNX (>= 2 GB): not supported")
    return proto.SerializeToString()


def _parity(model: torch.nn.Module, data: bytes, size: int, name: str, task: Task,
            generator: torch.Generator) -> tuple[float, float]:
    """(max |logit difference|, max |probability difference|) of onnxruntime running `data` against torch
    on a random batch of CHECK_BATCH: checked on the exact bytes that will be written."""
    batch = torch.randn(CHECK_BATCH, 3, size, size, generator=generator)
    with torch.no_grad():
        expected = model(batch.to(next(model.parameters()).device)).double().cpu()
    try:
        session = ort_session(data, [ORT_CPU], None)
    except Exception as err:  # ORT's own exception types, e.g. an opset newer than this onnxruntime
        raise CharsegError(f"onnxruntime {ort.__version__} cannot load the exported {name} "
                           f"({str(err).splitlines()[0]}): try a lower --opset") from err
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]).double()
    if got.shape != expected.shape:
        raise CharsegError(f"ONNX export of {name}: onnxruntime returned shape {tuple(got.shape)}, torch "
                           f"{tuple(expected.shape)}")
    probs_diff = (probabilities(task, got) - probabilities(task, expected)).abs().max()
    return float((got - expected).abs().max()), float(probs_diff)


def export_command(path: Path, model_name: str, *, overwrite: bool = False) -> str:
    """The export command (in backticks) that writes model_name's ONNX file to `path`."""
    command = f"`charseg export --model {model_name}{' --overwrite' if overwrite else ''}`"
    if Path(path) == PROJECT.onnx(model_name):
        return command
    return f"{command} with `--output {path}` to write it there"


class OnnxSegmenter:
    """The Segmenter protocol (charseg.inference) on ONNX Runtime: a normalised (B, 3, S, S) float32 batch in,
    probabilities float32 out: (B, S, S) foreground (person task), (B, C, S, S) per class (characters task)."""

    def __init__(self, path: str | Path, providers: Sequence[Any] | None = None, *, threads: int | None = None,
                 model_name: str | None = None):
        """providers: ONNX Runtime providers (charseg.device.ort_providers); None: CUDA when this onnxruntime
        build has it, else the CPU. model_name: the model this file is meant to be, when the caller knows it;
        the errors then say how to export that model to `path`, else they name the file as the wrong one."""
        path = Path(path)
        self.model_name = model_name
        if not path.is_file():
            raise CharsegError(f"ONNX model {path} not found: " + (
                f"write it with {export_command(path, model_name)}" if model_name else
                "pass the path of a file that `charseg export` wrote"))
        available = ort.get_available_providers()
        auto = providers is None
        if auto:  # the GPU when this onnxruntime build has CUDA, else the CPU
            providers = [ORT_CUDA, ORT_CPU] if ORT_CUDA in available else [ORT_CPU]
        wanted = [p if isinstance(p, str) else p[0] for p in providers]  # a provider may be (name, options)
        missing = [p for p in wanted if p not in available]
        if missing:
            raise CharsegError(f"onnxruntime here offers {', '.join(available)}, not {', '.join(missing)}: "
                               f"install onnxruntime-gpu for CUDA, or use --device cpu")
        try:
            self.session = ort_session(str(path), providers, threads)
        except Exception as err:  # ORT raises its own exception types for a file that is not ONNX
            raise CharsegError(f"{path} is not a readable ONNX model ({type(err).__name__}): "
                               f"{self._fix(path)}") from err
        # ORT falls back to the CPU silently when the CUDA libraries fail to load; asked-for CUDA must not.
        if not auto and ORT_CUDA in wanted and ORT_CUDA not in self.session.get_providers():
            raise CharsegError(f"onnxruntime could not start CUDA for {path} (CUDA/cuDNN libraries not found?): "
                               f"fix the CUDA install or use --device cpu")
        self.providers: list[str] = self.session.get_providers()
        self.meta = self._read_meta(path)
        self.img_size = int(self.meta["img_size"])
        try:
            self.task = task_of_checkpoint(self.meta)  # files exported before the characters task: person
        except CharsegError as err:
            raise CharsegError(f"{path}: its charseg metadata names no usable task ({err}): "
                               f"{self._fix(path)}") from None

    def _read_meta(self, path: Path) -> dict[str, Any]:
        text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise CharsegError(f"{path} has no charseg metadata (it was not written by `charseg export`): "
                               f"{self._fix(path)}")
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            meta = None
        missing = [k for k in ("img_size", "mean", "std", "threshold") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise CharsegError(f"{path}: its charseg metadata is damaged (missing {', '.join(missing)}): "
                               f"{self._fix(path)}")
        return meta

    def _fix(self, path: Path) -> str:
        if self.model_name:
            return f"re-export it with {export_command(path, self.model_name, overwrite=True)}"
        return (f"replace {path} with a file that `charseg export --model <name>` wrote, "
                f"or pass a valid --onnx")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        expected = (3, self.img_size, self.img_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"expected a (B, {', '.join(map(str, expected))}) batch, got {batch.shape}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        return logits_to_probabilities(self.task, torch.from_numpy(logits))
