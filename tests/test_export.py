"""ONNX export: parity with torch at several batch sizes, the embedded metadata, and every refusal
(parity failure, existing output, missing or wrong-arch checkpoint, unknown model, foreign .onnx)."""
from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from charseg import export
from charseg import models
from charseg.errors import CharsegError
from charseg.inference import TorchSegmenter, preprocess
from charseg.device import ORT_CPU, ORT_CUDA, ort_providers
from charseg.onnx import ExportReport, OnnxSegmenter, export_onnx
from charseg.config import load_params
from tests.conftest import REPO_ROOT

IMG_SIZE = 32  # the smallest size every arch accepts (unetpp and dinov2_fpn need multiples of 32)
MODELS = load_params(REPO_ROOT / "params.yaml")["models"]


def offline(name: str) -> dict:
    return {**MODELS[name], "encoder_weights": None}


def make_checkpoint(path: Path, name: str) -> tuple[torch.nn.Module, dict]:
    """A randomly initialised models.<name> saved at IMG_SIZE, loaded back as predict would."""
    cfg = offline(name)
    torch.manual_seed(0)
    model = models.build_model(cfg, pretrained=False, name=name).eval()
    models.save_checkpoint(path, model, model_name=name, cfg=cfg, img_size=IMG_SIZE, mean=models.IMAGENET_MEAN,
                           std=models.IMAGENET_STD, epoch=3, val_dice=0.25)
    return models.load_checkpoint(path)


def torch_probs(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(batch)))[:, 0].numpy()


def normalized_batch(n: int, seed: int) -> np.ndarray:
    """What preprocess yields: ImageNet-normalised RGB in [0, 1], (n, 3, S, S) float32."""
    rgb = np.random.default_rng(seed).random((n, 3, IMG_SIZE, IMG_SIZE), dtype=np.float32)
    mean = np.array(models.IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(models.IMAGENET_STD, np.float32)[:, None, None]
    return (rgb - mean) / std


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """pspnet (the fastest arch to export) through the CLI, once for the module."""
    root = tmp_path_factory.mktemp("export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = root / "models" / "pspnet" / "best.pt"
        model, meta = make_checkpoint(checkpoint, "pspnet")
        params = root / "params.yaml"
        params.write_text(yaml.safe_dump({"models": MODELS}, sort_keys=False))
        output = root / "exports" / "pspnet.onnx"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            export.main(["--model", "pspnet", "--checkpoint", str(checkpoint), "--output", str(output),
                         "--params", str(params)])
        yield {"root": root, "checkpoint": checkpoint, "model": model, "meta": meta, "params": params,
               "output": output, "printed": printed.getvalue()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # exports a model to ONNX
def test_cli_writes_one_file_and_reports_the_difference(exported):
    assert sorted(p.name for p in exported["output"].parent.iterdir()) == ["pspnet.onnx"]  # no temp, no .data
    assert f"wrote {exported['output']}" in exported["printed"]
    assert "max |logit diff|" in exported["printed"] and "max |prob diff|" in exported["printed"]
    graph = onnx.load(exported["output"]).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, IMG_SIZE, IMG_SIZE]


@pytest.mark.slow  # exports a model to ONNX
@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_matches_torch_at_any_batch_size(exported, batch_size):
    segmenter = OnnxSegmenter(exported["output"], threads=1)
    batch = normalized_batch(batch_size, seed=batch_size)
    probs = segmenter(batch)
    assert probs.shape == (batch_size, IMG_SIZE, IMG_SIZE) and probs.dtype == np.float32
    assert np.abs(probs - torch_probs(exported["model"], batch)).max() < 1e-4
    assert segmenter.providers == [ORT_CPU]


@pytest.mark.slow  # exports a model to ONNX
def test_embedded_metadata_rebuilds_the_preprocessing(exported):
    """Frames preprocessed from the .onnx file's own metadata give torch's probabilities."""
    frames = [np.random.default_rng(i).integers(0, 256, (48, 80, 3), dtype=np.uint8) for i in range(2)]
    onnx_segmenter = OnnxSegmenter(exported["output"], threads=1)
    torch_segmenter = TorchSegmenter(exported["model"], exported["meta"], torch.device("cpu"))
    probs = onnx_segmenter(preprocess(frames, onnx_segmenter.meta))
    assert np.abs(probs - torch_segmenter(preprocess(frames, exported["meta"]))).max() < 1e-4


@pytest.mark.slow  # exports a model to ONNX
def test_metadata_round_trip(exported):
    meta = OnnxSegmenter(exported["output"], providers=[ORT_CPU], threads=1).meta
    expected = {k: v for k, v in exported["meta"].items() if k not in ("format", "version")}
    assert {k: meta[k] for k in expected} == expected
    assert meta["checkpoint_sha256"] == hashlib.sha256(exported["checkpoint"].read_bytes()).hexdigest()


@pytest.mark.slow  # exports a model to ONNX
def test_batch_of_the_wrong_size_is_rejected(exported):
    with pytest.raises(ValueError, match=f"expected a \\(B, 3, {IMG_SIZE}, {IMG_SIZE}\\) batch"):
        OnnxSegmenter(exported["output"], threads=1)(np.zeros((1, 3, 16, 16), np.float32))


@pytest.mark.slow  # exports a model to ONNX
def test_cli_refuses_to_overwrite(exported):
    before = exported["output"].read_bytes()
    with pytest.raises(CharsegError, match="exists: pass --overwrite"):
        export.main(["--model", "pspnet", "--checkpoint", str(exported["checkpoint"]),
                     "--output", str(exported["output"]), "--params", str(exported["params"])])
    assert exported["output"].read_bytes() == before


class NoisyNet(torch.nn.Module):
    """Random in its forward pass: torch and onnxruntime draw different numbers, so parity must fail."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + 10 * torch.rand_like(x[:, :1])


class NanNet(NoisyNet):
    """NaN from both runtimes: a NaN difference must fail the check, not slip past a `>` comparison."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.head(x) - 1e6)


@pytest.mark.slow  # exports a model to ONNX
@pytest.mark.parametrize("model", [NoisyNet(), NanNet()], ids=["noisy", "nan"])
def test_parity_failure_writes_nothing(tmp_path, model):
    output = tmp_path / "model.onnx"
    meta = {"model_name": "m", "img_size": IMG_SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "threshold": 0.5}
    with pytest.raises(CharsegError, match=r"failed the parity check .*max \|prob difference\| \S+ > tolerance"):
        export_onnx(model, meta, output)
    assert list(tmp_path.iterdir()) == []


def test_opsets_older_than_the_exporter_supports_are_refused(tmp_path):
    with pytest.raises(CharsegError, match="--opset 11: torch's ONNX exporter writes opset 18 or newer"):
        export_onnx(NoisyNet(), {"img_size": IMG_SIZE}, tmp_path / "m.onnx", opset=11)


def cli(tmp_path: Path, *args: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"models": MODELS}, sort_keys=False))
    export.main([*args, "--params", str(params), "--output", str(tmp_path / "out.onnx")])


def test_unknown_model_lists_the_choices(tmp_path):
    choices = ", ".join(MODELS)
    with pytest.raises(CharsegError, match=f"unknown model 'nope': params.yaml 'models:' defines {choices}$"):
        cli(tmp_path, "--model", "nope")


def test_missing_checkpoint_says_how_to_get_it(tmp_path):
    with pytest.raises(CharsegError, match=r"best.pt not found: train it with `dvc repro train@deeplabv3`"):
        cli(tmp_path, "--model", "deeplabv3", "--checkpoint", str(tmp_path / "models/deeplabv3/best.pt"))


def test_checkpoint_alone_exports_anywhere(tmp_path, monkeypatch, one_torch_thread):
    """No params.yaml and no --model: the checkpoint names its model; the output defaults to exports/<it>.onnx."""
    checkpoint = tmp_path / "elsewhere" / "best.pt"
    make_checkpoint(checkpoint, "pspnet")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    calls = []

    def fake_export(model, meta, output, **options):
        calls.append((meta, output, options))
        return ExportReport(Path(output), 1, 20, 3, 0.0, 0.0, 1e-3)
    monkeypatch.setattr(export, "export_onnx", fake_export)
    export.main(["--checkpoint", str(checkpoint)])
    [(meta, output, options)] = calls
    assert meta["arch"] == "pspnet" and output == Path("exports") / "pspnet.onnx"
    assert options["source_checkpoint"] == checkpoint
    with pytest.raises(CharsegError, match="give --model NAME .* or --checkpoint PATH"):
        export.main([])


@pytest.mark.slow  # exports a model to ONNX
def test_checkpoint_alone_exports_for_real_from_any_directory(tmp_path, monkeypatch, one_torch_thread):
    checkpoint = tmp_path / "elsewhere" / "best.pt"
    model, _ = make_checkpoint(checkpoint, "pspnet")
    monkeypatch.chdir(tmp_path)
    export.main(["--checkpoint", str(checkpoint)])
    written = tmp_path / "exports" / "pspnet.onnx"
    segmenter = OnnxSegmenter(written, threads=1)
    assert segmenter.meta["arch"] == "pspnet" and sorted(p.name for p in written.parent.iterdir()) == ["pspnet.onnx"]
    batch = normalized_batch(2, seed=0)
    assert np.abs(segmenter(batch) - torch_probs(model, batch)).max() < 1e-4


def test_checkpoint_of_another_arch_is_refused(tmp_path, one_torch_thread):
    checkpoint = tmp_path / "models" / "pspnet" / "best.pt"
    make_checkpoint(checkpoint, "pspnet")
    with pytest.raises(CharsegError, match="holds a 'pspnet' model but params.yaml says arch 'deeplabv3'"):
        cli(tmp_path, "--model", "deeplabv3", "--checkpoint", str(checkpoint))
    assert not (tmp_path / "out.onnx").exists()


def test_onnx_files_not_from_charseg_are_refused(tmp_path):
    missing = tmp_path / "pspnet.onnx"
    with pytest.raises(CharsegError, match="not found: write it with `charseg export --model pspnet`"):
        OnnxSegmenter(missing, model_name="pspnet")
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["image"], ["logits"])
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [tensor("image", onnx.TensorProto.FLOAT, ["B", 3, 8, 8])],
                                   [tensor("logits", onnx.TensorProto.FLOAT, ["B", 3, 8, 8])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(CharsegError, match="not written by `charseg export`"):
        OnnxSegmenter(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(CharsegError, match="is not a readable ONNX model"):
        OnnxSegmenter(garbage)


def test_device_names_map_to_providers():
    assert ort_providers("auto") is None
    assert ort_providers("cpu") == [ORT_CPU]
    assert ort_providers("cuda:1") == [(ORT_CUDA, {"device_id": 1}), ORT_CPU]
    with pytest.raises(CharsegError, match="not a device"):
        ort_providers("gpu")


@pytest.mark.slow  # exports a model to ONNX
@pytest.mark.skipif(ORT_CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_asked_without_cuda_onnxruntime_says_what_to_install(exported):
    with pytest.raises(CharsegError, match="install onnxruntime-gpu for CUDA, or use --device cpu"):
        OnnxSegmenter(exported["output"], providers=ort_providers("cuda"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in MODELS if MODELS[n]["arch"] != "pspnet"))
def test_every_other_arch_exports_with_parity(tmp_path, one_torch_thread, name):
    model, meta = make_checkpoint(tmp_path / "best.pt", name)
    report = export_onnx(model, meta, tmp_path / f"{name}.onnx")
    assert report.max_abs_probs <= report.tolerance
    batch = normalized_batch(1, seed=0)
    probs = OnnxSegmenter(report.path, threads=1)(batch)
    assert np.abs(probs - torch_probs(model, batch)).max() < 1e-4
