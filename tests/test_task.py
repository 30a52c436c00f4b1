"""The task layer (charseg.task), the multi-class metrics and the class-id data path, against hand-computed
cases: absent classes, empty frames, NaN handling, weights of classes the training side never shows."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from charseg import task as tasks
from charseg.data import cache_pairs, class_pixels, has_foreground, read_pair, resize_pair
from charseg.errors import CharsegError
from charseg.layout import FramesDir, IdentityDir, MasksDir
from charseg.metrics import class_confusion, mean_iou, per_class_dice, per_class_iou

CLASSES = ("background", "alice", "bob", "other")
CHARACTERS = tasks.characters_task(CLASSES)


# --- Task ------------------------------------------------------------------------------------------

def test_the_two_tasks_and_their_outputs():
    person = tasks.person_task()
    assert (person.name, person.classes, person.outputs, person.characters) == \
        ("person", ("background", "person"), 1, ())
    assert (CHARACTERS.outputs, CHARACTERS.characters, CHARACTERS.character_ids) == (4, ("alice", "bob"), [1, 2])


@pytest.mark.parametrize("classes, message", [
    (["alice", "bob", "other"], "start with 'background' and end with 'other'"),
    (["background", "alice", "bob"], "start with 'background' and end with 'other'"),
    (["background", "alice", "alice", "other"], r"\['alice'\] more than once"),
])
def test_bad_class_lists_are_refused(classes, message):
    with pytest.raises(CharsegError, match=message):
        tasks.characters_task(classes)


def test_read_classes_from_the_identity_stage(tmp_path):
    path = tmp_path / "classes.json"
    with pytest.raises(CharsegError, match=r"classes.json not found: .*dvc repro identity"):
        tasks.read_classes(path)
    path.write_text(json.dumps({"classes": list(CLASSES), "not_found": ["Zoë"]}))
    assert tasks.read_classes(path) == CHARACTERS
    path.write_text(json.dumps({"classes": ["background", "other"], "not_found": ["alice", "bob"]}))
    with pytest.raises(CharsegError, match=r"names no character .*not found: \['alice', 'bob'\].*task: person"):
        tasks.read_classes(path)


def test_task_of_a_checkpoint_and_a_wrong_task_error():
    assert tasks.task_of_checkpoint({"format": "charseg-checkpoint"}) == tasks.person_task()  # old checkpoints
    assert tasks.task_of_checkpoint({"task": "characters", "classes": list(CLASSES)}) == CHARACTERS
    with pytest.raises(CharsegError, match="retrain it"):
        tasks.task_of_checkpoint({"task": "characters"})
    tasks.require_task(CHARACTERS, "characters", "models/unetpp/best.pt")
    with pytest.raises(CharsegError, match=r"models/unetpp/best.pt was trained for the 'person' task but "
                                           r"params.yaml says task: characters: .*-S task=characters"):
        tasks.require_task(tasks.person_task(), "characters", "models/unetpp/best.pt")


def test_class_map_and_probabilities():
    person_logits = torch.tensor([[[[-2.0, 0.5], [0.0, 3.0]]]])
    assert tasks.class_map(tasks.person_task(), person_logits).tolist() == [[[0, 1], [0, 1]]]
    assert torch.allclose(tasks.probabilities(tasks.person_task(), person_logits), torch.sigmoid(person_logits))
    logits = torch.zeros(1, 4, 1, 3)
    logits[0, 2, 0, 0] = logits[0, 3, 0, 1] = 1.0  # the third pixel is a 4-way tie: the lowest id wins
    assert tasks.class_map(CHARACTERS, logits).tolist() == [[[2, 3, 0]]]
    probs = tasks.probabilities(CHARACTERS, logits)
    assert probs.shape == (1, 4, 1, 3) and torch.allclose(probs.sum(1), torch.ones(1, 1, 3))
    assert probs[0, :, 0, 2].tolist() == pytest.approx([0.25] * 4)


def test_palette_background_black_other_grey_characters_distinct():
    colours = tasks.palette(tasks.characters_task(["background", *"abcdefgh", "other"]))
    assert colours.dtype == np.uint8 and colours.shape == (10, 3)
    assert colours[0].tolist() == [0, 0, 0] and colours[-1].tolist() == [128, 128, 128]
    assert len({tuple(c) for c in colours}) == 10
    # Adding characters keeps the colours of those before them.
    assert (tasks.palette(CHARACTERS)[1:3] == colours[1:3]).all()
    assert tasks.palette(tasks.person_task()).tolist() == [[0, 0, 0], colours[1].tolist()]


# --- losses ----------------------------------------------------------------------------------------

def test_class_weights_inverse_sqrt_frequency_absent_class_zero():
    # frequencies 0.9 / 0.1 / 0: raw 1/sqrt(f) = 1.054, 3.162; pixel-weighted mean 1.265 -> 0.8333, 2.5
    weights = tasks.class_weights([900, 100, 0])
    assert weights.tolist() == pytest.approx([5 / 6, 2.5, 0.0])
    assert float((torch.tensor([0.9, 0.1, 0.0]) * weights).sum()) == pytest.approx(1.0)
    with pytest.raises(CharsegError, match="some pixel"):
        tasks.class_weights([0, 0, 0])


def test_person_loss_is_the_binary_dice():
    logits = torch.tensor([[[[10.0, -10.0], [10.0, -10.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert float(tasks.loss(tasks.person_task())(logits, target)) == pytest.approx(0.0, abs=1e-3)
    assert float(tasks.loss(tasks.person_task())(logits, 1 - target)) == pytest.approx(1.0, abs=1e-3)


def test_multiclass_dice_plus_cross_entropy_by_hand():
    task = tasks.characters_task(["background", "alice", "other"])
    # Uniform logits: p = 1/3 everywhere. Target 2 background + 2 alice pixels, no `other`.
    # Dice per class: background 2*(2/3) / (4/3 + 2) = 0.4, alice 0.4, other absent from the target: no term.
    # smp averages over all 3 classes: (0.6 + 0.6 + 0) / 3 = 0.4. Cross entropy: log 3 at every pixel.
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([[[0, 0], [1, 1]]])
    assert float(tasks.loss(task)(logits, target)) == pytest.approx(0.4 + math.log(3), abs=1e-5)
    # Class weights 1 / 3 / 0: pixel 0 (background, logits 0,0,0) costs log 3, pixel 3 (alice, logits
    # 0,log 2,0 -> p = 1/2) costs log 2; the mean is weighted by the targets' weights: (2 log 3 + 2*3 log 2) / 8.
    logits[0, 1, 1, :] = math.log(2)
    weighted = tasks.loss(task, torch.tensor([1.0, 3.0, 0.0]))
    cross_entropy = float(weighted(logits, target) - weighted.dice(logits, target))
    assert cross_entropy == pytest.approx((2 * math.log(3) + 6 * math.log(2)) / 8, abs=1e-5)


def test_multiclass_loss_finite_when_every_target_pixel_weighs_zero():
    task = tasks.characters_task(["background", "alice", "other"])
    loss = tasks.loss(task, torch.tensor([1.0, 2.0, 0.0]))  # `other` never seen in training
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    value = loss(logits, torch.full((2, 4, 4), 2))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    with pytest.raises(CharsegError, match="3 classes but"):
        tasks.loss(task, torch.ones(4))


# --- multi-class metrics ---------------------------------------------------------------------------

PRED = np.array([[0, 1, 1],
                 [2, 2, 0]])
TARGET = np.array([[0, 1, 2],
                   [2, 0, 0]])


def test_class_confusion_rows_target_columns_prediction():
    matrix = class_confusion(PRED, TARGET, 4)
    assert matrix.tolist() == [[2, 0, 1, 0],   # background: 2 right, 1 taken for bob
                               [0, 1, 0, 0],   # alice: 1 right
                               [0, 1, 1, 0],   # bob: 1 taken for alice, 1 right
                               [0, 0, 0, 0]]   # other: nowhere
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(class_confusion(torch.tensor(PRED), torch.tensor(TARGET), 4), matrix)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 2\)"):
        class_confusion(PRED, TARGET, 2)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 2\)"):
        class_confusion(torch.tensor(PRED), torch.tensor(TARGET), 2)


def test_per_class_scores_nan_for_absent_classes():
    matrix = class_confusion(PRED, TARGET, 4)
    # IoU = tp / (tp + fp + fn): background 2/(2+0+1), alice 1/(1+1+0), bob 1/(1+1+1), other in neither: NaN
    np.testing.assert_allclose(per_class_iou(matrix), [2 / 3, 0.5, 1 / 3, np.nan])
    np.testing.assert_allclose(per_class_dice(matrix), [0.8, 2 / 3, 0.5, np.nan])
    assert mean_iou(matrix, [1, 2]) == pytest.approx((0.5 + 1 / 3) / 2)
    assert mean_iou(matrix, [1, 2, 3]) == pytest.approx((0.5 + 1 / 3) / 2)  # NaN left out, not a zero


def test_empty_frames_and_classes_only_predicted():
    empty = np.zeros((2, 3), np.int64)
    matrix = class_confusion(empty, empty, 4)
    np.testing.assert_allclose(per_class_iou(matrix), [1.0, np.nan, np.nan, np.nan])
    assert math.isnan(mean_iou(matrix, [1, 2]))  # no character anywhere: no score, not 0 or 1
    claimed = class_confusion(np.array([[1, 0, 0]]), np.zeros((1, 3), np.int64), 4)
    assert per_class_iou(claimed)[1] == 0.0 and mean_iou(claimed, [1, 2]) == 0.0  # a false alarm scores 0
    assert class_confusion(np.zeros((0,), np.int64), np.zeros((0,), np.int64), 3).sum() == 0


# --- class-id data path ----------------------------------------------------------------------------

def test_resize_of_class_ids_invents_no_id():
    image = np.zeros((4, 4, 3), np.uint8)
    ids = np.kron(np.array([[0, 5], [2, 7]], np.uint8), np.ones((2, 2), np.uint8))
    _, small = resize_pair(image, ids, 2, class_ids=True)
    assert small.tolist() == [[0, 5], [2, 7]]
    # Enlarging interpolates each class's coverage, never the ids themselves: only ids 5 and 7 appear.
    _, big = resize_pair(np.zeros((2, 2, 3), np.uint8), np.array([[5, 7], [7, 5]], np.uint8), 9, class_ids=True)
    assert set(np.unique(big)) == {5, 7}
    # A thin character keeps its id at a half-pixel width rather than vanishing into its neighbours.
    stripes = np.zeros((8, 8), np.uint8)
    stripes[:, 2:4] = 3
    _, half = resize_pair(np.zeros((8, 8, 3), np.uint8), stripes, 4, class_ids=True)
    assert half.tolist() == [[0, 3, 0, 0]] * 4


def write_pair(root, frame_id: str, class_ids: np.ndarray) -> tuple[FramesDir, IdentityDir]:
    frames, identity = FramesDir(root / "frames"), IdentityDir(root / "identity")
    frames.images.mkdir(parents=True, exist_ok=True)
    identity.images.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(frames.image(frame_id)), np.full((*class_ids.shape, 3), 90, np.uint8))
    cv2.imwrite(str(identity.class_map(frame_id)), class_ids)
    return frames, identity


def test_class_maps_cached_as_ids_under_their_own_keys(tmp_path):
    ids = np.zeros((32, 48), np.uint8)
    ids[4:20, 8:20], ids[10:30, 30:40] = 1, 3
    frames, identity = write_pair(tmp_path, "alice--c--00000001", ids)
    image, target = read_pair(frames, identity, "alice--c--00000001", class_ids=True)
    assert target.dtype == np.uint8 and (target == ids).all() and image.shape == (32, 48, 3)
    [cached] = cache_pairs(["alice--c--00000001"], frames, identity, 16, tmp_path / "cache", class_ids=True)
    assert set(np.unique(np.load(cached)[..., 3])) == {0, 1, 3}
    assert class_pixels([cached], 4).tolist() == np.bincount(np.load(cached)[..., 3].ravel(), minlength=4).tolist()
    assert has_foreground([cached])
    # The same bytes read as a 0/255 person mask are another cache entry, not this one.
    masks = MasksDir(identity.root)
    assert cache_pairs(["alice--c--00000001"], frames, masks, 16, tmp_path / "cache") != [cached]
    with pytest.raises(CharsegError, match=r"class id 3 but the task has only 3 classes.*dvc repro identity"):
        class_pixels([cached], 3)


def test_missing_class_map_names_the_identity_stage(tmp_path):
    frames, identity = write_pair(tmp_path, "a--c--00000001", np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(frames.image("a--c--00000002")), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CharsegError, match=r"no class map .*a--c--00000002.*dvc repro identity"):
        read_pair(frames, identity, "a--c--00000002", class_ids=True)
    cv2.imwrite(str(identity.class_map("a--c--00000002")), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CharsegError, match=r"one uint8 channel.*dvc repro identity"):
        read_pair(frames, identity, "a--c--00000002", class_ids=True)
