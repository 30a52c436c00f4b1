"""The CUDA paths, on a GPU only (skipped without one; benchmarks/device_check.sh runs them with -m cuda):
an AMP + channels-last training epoch, a 2-process NCCL DDP epoch (>= 2 GPUs), the masks stage with
labels.half on real YOLO and SAM architectures (random weights, built offline), predict with autocast, and
ONNX Runtime's CUDA provider (when this onnxruntime build has it). Person task throughout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import TINY_PSPNET, tiny_checkpoint, write_video
from charseg import predict
from charseg.config import SamConfig
from charseg.inference import TorchSegmenter, preprocess
from charseg.labels import detect
from charseg.models import load_checkpoint
from charseg.train import Trainer, train_model
from charseg.video import probe
from tests.conftest import REPO_ROOT
from tests.test_masks import COLUMNS, FRAMES, config as labels_config, make_frames as make_label_frames, run
from tests.test_train import cli_args, config as train_config, make_frames, paths, tiny_model, write_params

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU: torch.cuda.is_available() is false (run "
                                        "benchmarks/device_check.sh on a GPU machine)")]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return make_frames(tmp_path_factory.mktemp("frames"), n_train=32, n_val=8)


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # dvclive looks for a DVC repo in the working directory: not ours


def test_amp_channels_last_epoch_trains_and_saves_a_checkpoint(tmp_path, frames):
    run = Trainer.setup(tiny_model(), train_config(epochs=2, amp=True), paths(frames, tmp_path),
                        device=torch.device("cuda"))
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert run.rt.precision.amp_dtype == expected
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert run.optimization.scaler.is_enabled() == (expected == torch.float16)  # loss scaling for fp16 only
    seen = []
    conv.register_forward_hook(lambda module, args, out: seen.append((out.dtype, args[0].is_contiguous(
        memory_format=torch.channels_last))))
    run.resume_or_start()
    for epoch in run.remaining_epochs():
        run.save(run.fit_epoch(epoch))
    best = run.finish()
    assert seen and all(dtype == expected and channels_last for dtype, channels_last in seen)
    assert np.isfinite(best["train/loss"]) and 0.0 <= best["val/dice"] <= 1.0
    model, meta = load_checkpoint(tmp_path / "models" / "tiny" / "best.pt")
    assert meta["epoch"] == best["epoch"] and all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_train_model_on_cuda_learns_like_on_the_cpu(tmp_path, frames):
    """The whole train_model path on the GPU with AMP; the figures are exact, so it must learn them."""
    best = train_model(tiny_model(), train_config(epochs=10, amp=True), paths(frames, tmp_path), device="cuda")
    assert best["val/dice"] >= 0.8


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs at least 2 GPUs")
@pytest.mark.slow
def test_torchrun_two_gpu_processes_train_one_nccl_epoch(tmp_path, frames):
    params = write_params(tmp_path / "params.yaml", epochs="1", img_size="64", batch_size="4")
    args = cli_args(frames, params)
    args[args.index("--device") + 1] = "cuda"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "NCCL_DEBUG": "WARN"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stages.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tiny epoch 1/1: train loss") == 1  # only rank 0 reports
    model, meta = load_checkpoint(tmp_path / "models" / "tiny" / "best.pt")
    assert meta["epoch"] == 1 and meta["train_params"]["batch_size"] == 4
    summary = json.loads((tmp_path / "dvclive" / "tiny" / "metrics.json").read_text())
    assert 0.0 <= summary["best_val_dice"] <= 1.0


def test_masks_stage_in_half_precision_with_real_yolo_and_vit_b(tmp_path, monkeypatch):
    """Real YOLOv8n and SAM vit_b (random weights, from files as the loaders read them) on the GPU in half
    precision. Random YOLO finds nobody, so it runs and its answer is replaced by the planted persons of the
    frames (tests.planted_labels); SAM then runs in fp16 on those boxes."""
    from segment_anything import sam_model_registry
    from ultralytics import YOLO

    from planted_labels import PlantedDetector

    torch.manual_seed(0)
    (tmp_path / "weights").mkdir()
    YOLO("yolov8n.yaml").save(tmp_path / "weights/yolov8n.pt")
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), tmp_path / "weights/sam_vit_b.pth")
    cfg = labels_config(tmp_path, device="cuda", half=True)
    cfg = replace(cfg, detector=replace(cfg.detector, weights=tmp_path / "weights/yolov8n.pt"),
                  sam=SamConfig(model="vit_b", checkpoint=tmp_path / "weights/sam_vit_b.pth"))

    yolo_half, encoder_dtypes = [], []
    real_detect, make_segmenter = detect.PersonDetector.detect, detect.make_segmenter

    def detect_then_plant(self, images):
        real_detect(self, images)
        yolo_half.append(getattr(self.model.predictor.model, "fp16", None))
        return PlantedDetector().detect(images)

    def spying_segmenter(*args, **kwargs):
        segmenter = make_segmenter(*args, **kwargs)
        sam = segmenter.model if hasattr(segmenter, "model") else segmenter.predictor.model
        sam.image_encoder.register_forward_hook(lambda m, a, out: encoder_dtypes.append(out.dtype))
        return segmenter

    monkeypatch.setattr(detect.PersonDetector, "detect", detect_then_plant)
    monkeypatch.setattr(detect, "make_segmenter", spying_segmenter)
    make_label_frames(tmp_path / "frames")
    metrics, rows, out = run(tmp_path, cfg)

    assert yolo_half and all(yolo_half), "YOLO did not run in half precision"
    with_persons = [i for i, (*_, persons) in FRAMES.items() if persons]
    assert encoder_dtypes == [torch.float16] * len(with_persons)  # one fp16 encoder pass per frame with persons
    for frame_id, row in rows.items():
        if frame_id in with_persons:
            assert row["status"] in ("labelled", "failed")  # random SAM weights may segment nothing
            assert np.isfinite(json.loads(row["sam_scores"])).all()  # no fp16 overflow
        else:
            assert row["status"] == "empty"
    report = json.loads((out / "masks/report.json").read_text())
    assert report["source"]["half"] is True and report["source"]["sam_model_type"] == "vit_b"
    assert set(COLUMNS) <= set(next(iter(rows.values())))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("predict"), 64, TINY_PSPNET)


def test_predict_with_autocast_matches_float32_on_the_cpu(tmp_path, checkpoint):
    video = write_video(tmp_path / "clip.avi", 12, 25.0, (96, 64))
    gpu = TorchSegmenter.from_checkpoint(checkpoint, device=torch.device("cuda"), amp=True)
    cpu = TorchSegmenter.from_checkpoint(checkpoint)
    assert gpu.amp_dtype in (torch.bfloat16, torch.float16)
    batch = preprocess([np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8)] * 2, gpu.meta)
    assert np.abs(gpu(batch) - cpu(batch)).max() < 0.05  # bf16 keeps ~3 significant digits of the logits

    result = predict.predict_video(gpu, probe(video), tmp_path / "out.mp4", threshold=0.5, batch_size=4,
                                   masks_dir=tmp_path / "masks", progress=False)
    assert (result.frames, result.inferred) == (12, 12)
    assert len(list((tmp_path / "masks").iterdir())) == 12 and (tmp_path / "out.mp4").stat().st_size > 0


def test_onnx_runs_on_the_cuda_provider_like_torch(tmp_path, checkpoint):
    import onnxruntime

    from charseg.device import ORT_CUDA, ort_providers
    from charseg.onnx import OnnxSegmenter, export_onnx

    if ORT_CUDA not in onnxruntime.get_available_providers():
        pytest.skip(f"this onnxruntime build has no {ORT_CUDA} (install onnxruntime-gpu for it)")
    cpu = TorchSegmenter.from_checkpoint(checkpoint)
    export_onnx(cpu.model, cpu.meta, tmp_path / "model.onnx")
    segmenter = OnnxSegmenter(tmp_path / "model.onnx", ort_providers("cuda"))
    assert segmenter.providers[0] == ORT_CUDA
    batch = preprocess([np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)] * 3, cpu.meta)
    assert np.abs(segmenter(batch) - cpu(batch)).max() < 1e-3
