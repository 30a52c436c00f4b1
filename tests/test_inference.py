"""The shared inference contract (charseg/inference.py): preprocessing as in training, a torch
Segmenter on a tiny random checkpoint, resizing back to the frame size, thresholding and smoothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charseg.data import normalize, resize_image
from charseg.errors import CharsegError
from charseg.inference import (Smoother, TorchSegmenter, binary_mask, infer_masks, predict_proba, preprocess,
                                  to_frame_size)
from charseg.models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint

IMG_SIZE = 32
CFG = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inference") / "pspnet" / "best.pt"
    save_checkpoint(path, build_model(CFG, pretrained=False), model_name="pspnet", cfg=CFG, img_size=IMG_SIZE,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, epoch=1, val_dice=0.0)
    return path


def frames(*sizes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_preprocess_resizes_and_normalises_exactly_as_training():
    images = frames((40, 56), (100, 30), (32, 32))
    meta = {"img_size": IMG_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    batch = preprocess(images, meta)
    assert batch.shape == (3, 3, IMG_SIZE, IMG_SIZE) and batch.dtype == np.float32 and batch.flags.c_contiguous
    # Training feeds data.resize_image's uint8 copy through data.normalize on the device.
    uint8 = torch.from_numpy(np.stack([resize_image(i, IMG_SIZE) for i in images]).transpose(0, 3, 1, 2).copy())
    np.testing.assert_allclose(batch, normalize(uint8, IMAGENET_MEAN, IMAGENET_STD).numpy(), atol=1e-5)


def test_torch_segmenter_gives_probabilities_and_batching_does_not_change_them(checkpoint):
    segmenter = TorchSegmenter.from_checkpoint(checkpoint, expect_arch="pspnet", device=torch.device("cpu"))
    assert segmenter.meta["img_size"] == IMG_SIZE and segmenter.meta["threshold"] == 0.5
    assert not segmenter.model.training and segmenter.amp_dtype is None  # amp is a CUDA-only option
    images = frames((40, 56), (24, 24))
    probs = segmenter(preprocess(images, segmenter.meta))
    assert probs.shape == (2, IMG_SIZE, IMG_SIZE) and probs.dtype == np.float32
    assert 0 <= probs.min() and probs.max() <= 1 and probs.std() > 0
    one_by_one = [predict_proba(segmenter, image) for image in images]
    assert [p.shape for p in one_by_one] == [(40, 56), (24, 24)]
    np.testing.assert_allclose(one_by_one[0], to_frame_size(probs[0], (40, 56)), atol=1e-5)


def test_checkpoint_errors_say_what_to_do(checkpoint, tmp_path):
    with pytest.raises(CharsegError, match=r"holds a 'pspnet' model but params.yaml says arch 'unetpp'"):
        TorchSegmenter.from_checkpoint(checkpoint, expect_arch="unetpp")
    with pytest.raises(CharsegError, match=r"dvc repro train@absent.*dvc pull"):
        TorchSegmenter.from_checkpoint(tmp_path / "models" / "absent" / "best.pt", model_name="absent")


def test_to_frame_size_is_bilinear_like_the_evaluate_stage_always_was():
    probs = np.random.default_rng(1).random((IMG_SIZE, IMG_SIZE), dtype=np.float32)
    for size in [(40, 56), (20, 12), (IMG_SIZE, IMG_SIZE)]:
        resized = to_frame_size(probs, size)
        torch_resized = F.interpolate(torch.from_numpy(probs)[None, None], size=size, mode="bilinear",
                                      align_corners=False)[0, 0].numpy()
        assert resized.shape == size and resized.dtype == np.float32
        np.testing.assert_allclose(resized, torch_resized, atol=1e-5)  # cv2 rounds its weights


def test_binary_mask_thresholds_strictly_and_monotonically():
    probs = np.random.default_rng(2).random((30, 40), dtype=np.float32)
    assert binary_mask(probs, 0.0).min() == 255 and binary_mask(probs, 1.0).max() == 0
    coverage = [(binary_mask(probs, t) > 0).mean() for t in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert coverage == sorted(coverage, reverse=True) and 0 < coverage[2] < 1
    assert set(np.unique(binary_mask(probs, 0.5))) == {0, 255} and binary_mask(probs, 0.5).dtype == np.uint8


def test_smoother_is_an_exponential_moving_average():
    maps = [np.full((2, 2), v, np.float32) for v in (0.2, 0.8, 0.2)]
    assert all(Smoother(None)(m) is m for m in maps)
    smooth = Smoother(0.5)
    assert [float(smooth(m)[0, 0]) for m in maps] == pytest.approx([0.2, 0.5, 0.35])


def test_infer_masks_returns_frame_sized_masks(checkpoint):
    segmenter = TorchSegmenter.from_checkpoint(checkpoint, device=torch.device("cpu"))
    images = frames((40, 56), (48, 64))
    masks = infer_masks(segmenter, preprocess(images, segmenter.meta), [(40, 56), (48, 64)], threshold=0.0)
    assert [m.shape for m in masks] == [(40, 56), (48, 64)] and all((m == 255).all() for m in masks)
