"""The evaluate stage in the characters task on tiny data: models that paint one class everywhere, so every
per-character score can be checked by hand; the ranking by mIoU, classes with no score, the exact per-character
truth (mapped by name), the outputs, and the errors for a checkpoint of another task or class list."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from charseg.config import EvaluateConfig, ModelConfig, TruthConfig
from charseg.errors import CharsegError, run_cli
from charseg.evaluate import evaluate
from charseg.io import read_csv, write_csv, write_json
from charseg.layout import FramesDir, IdentityDir, MasksDir
from charseg.models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint
from charseg.task import characters_task, person_task
from stages.evaluate import main

HEIGHT, WIDTH, IMG_SIZE = 40, 56, 32
PIXELS = HEIGHT * WIDTH
# carol is a class of the split that no validation frame shows and no model predicts: no score, shown '-'.
CLASSES = ["background", "alice", "bob", "carol", "other"]
ALICE, BOB, OTHER = 1, 2, 4
CFG = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}
# (folder, video, frame index, [(class id, (top, left, bottom, right))]) per validation frame.
VAL = [("alice", "alice/a.mp4", 0, [(ALICE, (5, 5, 25, 20)), (BOB, (10, 30, 35, 50))]),
       ("alice", "alice/a.mp4", 30, [(ALICE, (0, 0, 40, 10)), (OTHER, (20, 40, 40, 56))]),
       ("bob", "bob/b.mkv", 0, [(BOB, (5, 10, 30, 40))])]
ALICE_PIXELS, BOB_PIXELS, PERSON_PIXELS = 300 + 400, 500 + 750, 300 + 500 + 400 + 320 + 750
# The exact truth names its values itself; Zoë is no class, so her pixels are `other`. She stands in the
# first frame only, where the identity stage saw nobody.
TRUTH_VALUES = {"alice": 1, "bob": 2, "Zoë": 3, "other": 4}
ZOE_BOX, ZOE_PIXELS = (30, 0, 40, 20), 200

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def box_map(boxes: list[tuple[int, tuple[int, int, int, int]]], values: dict[int, int] | None = None) -> np.ndarray:
    ids = np.zeros((HEIGHT, WIDTH), np.uint8)
    for class_id, (top, left, bottom, right) in boxes:
        ids[top:bottom, left:right] = values[class_id] if values else class_id
    return ids


def make_project(root: Path) -> dict:
    frames, identity, truth = root / "frames" / "images", IdentityDir(root / "identity"), root / "truth"
    frames.mkdir(parents=True)
    identity.images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, truth_rows, val_ids = [], [], []
    truth_value = {ALICE: TRUTH_VALUES["alice"], BOB: TRUTH_VALUES["bob"], OTHER: TRUTH_VALUES["other"]}
    for n, (character, video, index, boxes) in enumerate(VAL):
        frame_id = f"{character}--{Path(video).stem}--{index * 1000:08d}"
        val_ids.append(frame_id)
        cv2.imwrite(str(frames / f"{frame_id}.jpg"), rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        cv2.imwrite(str(identity.class_map(frame_id)), box_map(boxes))
        exact = box_map(boxes, truth_value)
        if n == 0:
            top, left, bottom, right = ZOE_BOX
            exact[top:bottom, left:right] = TRUTH_VALUES["Zoë"]
        rel = f"{character}/{Path(video).stem}/{index:06d}"
        (truth / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(truth / f"{rel}.png"), (exact > 0).astype(np.uint8) * 255)
        cv2.imwrite(str(truth / f"{rel}.characters.png"), exact)
        truth_rows.append({"video": video, "frame_index": index, "mask": f"{rel}.png",
                           "character_mask": f"{rel}.characters.png"})
        rows.append({"id": frame_id, "character": character, "video": video, "frame_index": index,
                     "timestamp": index / 30, "width": WIDTH, "height": HEIGHT})
    write_csv(root / "frames" / "manifest.csv", rows, list(rows[0]))
    write_csv(truth / "index.csv", truth_rows, list(truth_rows[0]))
    write_json(truth / "characters.json", TRUTH_VALUES)
    write_json(identity.classes, {"classes": CLASSES, "not_found": []})
    write_json(root / "split.json", {"train": ["some-train-frame"], "val": val_ids})
    return {"frames": FramesDir(root / "frames"), "identity": identity, "split": root / "split.json",
            "truth": truth, "root": root}


def constant_checkpoint(models_dir: Path, name: str, class_id: int | None, classes: list[str] = CLASSES) -> None:
    """models/<name>/best.pt of the characters task painting `class_id` everywhere (None: a person model)."""
    task = characters_task(classes) if class_id is not None else person_task()
    model = build_model(CFG, pretrained=False, outputs=task.outputs)
    head = model.segmentation_head[0]
    torch.nn.init.zeros_(head.weight)
    bias = torch.zeros(task.outputs)
    if class_id is not None:
        bias[class_id] = 10.0
    with torch.no_grad():
        head.bias.copy_(bias)
    save_checkpoint(models_dir / name / "best.pt", model, model_name=name, cfg=CFG, img_size=IMG_SIZE,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, epoch=2, val_dice=0.0, task=task)


def model_configs(names: list[str]) -> dict[str, ModelConfig]:
    return {name: ModelConfig(name=name, arch="pspnet", encoder="resnet18", encoder_weights=None,
                              encoder_lr_mult=1.0, params=CFG) for name in names}


def run(project: dict, out: Path, names: list[str], models_dir: Path | None = None, truth: bool = True) -> dict:
    cfg = EvaluateConfig(boundary_tolerance_px=2, latency_warmup=1, grid_frames=3)
    return evaluate(model_configs(names), cfg, split=project["split"], frames=project["frames"],
                    masks=MasksDir(project["root"] / "no-masks"), models_dir=models_dir or project["root"] / "models",
                    metrics_dir=out / "metrics" / "evaluate", reports_dir=out / "reports",
                    plots_dir=out / "plots" / "evaluate", device="cpu", progress=False,
                    truth=TruthConfig(project["truth"], "index.csv") if truth else None, task="characters",
                    identity=project["identity"])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_characters")
    project = make_project(root)
    for name, class_id in {"alice": ALICE, "bob": BOB}.items():
        constant_checkpoint(root / "models", name, class_id)
    return project, run(project, root, ["alice", "bob"])


def test_per_character_scores_match_hand_computed_values(evaluated):
    _, results = evaluated
    alice, bob = results["alice"], results["bob"]
    # Painting alice everywhere: her IoU is her share of all pixels; bob, never predicted, scores 0.
    assert alice["iou_per_character"] == pytest.approx({"alice": ALICE_PIXELS / (3 * PIXELS), "bob": 0.0})
    assert alice["dice_per_character"] == pytest.approx(
        {"alice": 2 * ALICE_PIXELS / (ALICE_PIXELS + 3 * PIXELS), "bob": 0.0})
    assert alice["miou"] == pytest.approx(ALICE_PIXELS / (3 * PIXELS) / 2)  # carol has no score: not averaged
    assert bob["miou"] == pytest.approx(BOB_PIXELS / (3 * PIXELS) / 2)
    assert alice["other_iou"] == 0.0 and alice["pixel_accuracy"] == pytest.approx(ALICE_PIXELS / (3 * PIXELS))
    # All person classes merged: everything predicted against everyone in the class maps.
    assert alice["person_dice"] == pytest.approx(2 * PERSON_PIXELS / (PERSON_PIXELS + 3 * PIXELS))
    assert bob["person_dice"] == alice["person_dice"]
    # Boundary F1 over the frames where the character is predicted or true: an all-alice prediction has no
    # contour (the frame edge is none), so 0 where alice is true, 1 on the frame where she is absent.
    assert alice["boundary_f1_per_character"] == pytest.approx({"alice": 1 / 3, "bob": 0.0})
    assert alice["boundary_f1"] == pytest.approx((1 / 3 + 0.0) / 2)
    for result in results.values():
        assert "carol" not in result["iou_per_character"] and "carol" not in result["boundary_f1_per_character"]
        assert result["frames"] == 3 and result["best_epoch"] == 2 and result["latency_ms"] > 0


def test_exact_truth_maps_names_to_classes(evaluated):
    _, results = evaluated
    truth = results["alice"]["truth"]
    # Zoë is not a class: her pixels are `other`, so only the merged person score and other's IoU change.
    assert truth["iou_per_character"] == pytest.approx(results["alice"]["iou_per_character"])
    persons = PERSON_PIXELS + ZOE_PIXELS
    assert truth["person_dice"] == pytest.approx(2 * persons / (persons + 3 * PIXELS))
    assert truth["other_iou"] == 0.0 and results["bob"]["truth"]["miou"] == pytest.approx(results["bob"]["miou"])


def test_outputs_are_ranked_by_miou_and_missing_scores_show_as_dashes(evaluated):
    project, results = evaluated
    out = project["root"]
    for name, result in results.items():
        assert json.loads((out / "metrics" / "evaluate" / f"{name}.json").read_text()) == result
    rows = read_csv(out / "reports" / "comparison.csv")
    assert [r["model"] for r in rows] == ["bob", "alice"]  # bob's larger share of the pixels: higher mIoU
    assert float(rows[0]["miou"]) == pytest.approx(results["bob"]["miou"])
    assert {"iou[alice]", "iou[carol]", "dice[bob]", "bf1[alice]", "person_dice", "truth_miou",
            "truth_iou[bob]"} <= set(rows[0])
    assert rows[0]["iou[carol]"] == "" and float(rows[1]["iou[alice]"]) == pytest.approx(ALICE_PIXELS / (3 * PIXELS))
    report = (out / "reports" / "comparison.md").read_text()
    assert "ranked by mIoU" in report and report.index("| 1 | bob") < report.index("| 2 | alice")
    iou_table = report[report.index("## IoU per character"):report.index("## Dice per character")]
    assert "| Model | alice | bob | carol |" in iou_table and "| alice | 0.1042 | 0.0000 | - |" in iou_table
    plots = {p.name for p in (out / "plots" / "evaluate").iterdir()}
    assert plots == {"metrics.png", "iou_per_character.png", "confusion_alice.png", "confusion_bob.png",
                     "qualitative.png"}
    for name in plots:
        image = cv2.imread(str(out / "plots" / "evaluate" / name))
        assert image is not None and image.shape[0] > 100


def test_a_model_of_another_task_or_class_list_is_refused(evaluated, tmp_path):
    project, _ = evaluated
    constant_checkpoint(tmp_path / "models", "binary", None)
    with pytest.raises(CharsegError, match=r"model binary .* was trained for the 'person' task but params.yaml says "
                                           r"task: characters: retrain it with `dvc repro train@binary`"):
        run(project, tmp_path, ["binary"], models_dir=tmp_path / "models")
    constant_checkpoint(tmp_path / "models", "older", ALICE, ["background", "alice", "bob", "other"])
    with pytest.raises(CharsegError, match=r"model older .* was trained on the classes \['background', 'alice', "
                                           r"'bob', 'other'\] but .*classes.json lists .*dvc repro train@older"):
        run(project, tmp_path, ["older"], models_dir=tmp_path / "models")
    assert not (tmp_path / "metrics").exists()


def test_main_takes_the_task_and_the_identity_folder_from_params(evaluated, tmp_path, capsys):
    project, results = evaluated
    (tmp_path / "params.yaml").write_text(
        "task: characters\n"
        "models:\n" + "".join(f"  {name}: {{arch: pspnet, encoder: resnet18, encoder_weights: null, "
                              f"psp_out_channels: 16}}\n" for name in ("alice", "bob")) +
        "evaluate: {boundary_tolerance_px: 2, latency_warmup: 1, grid_frames: 0}\n"
        "labels: {truth_dir: null, mask_index: index.csv}\n")
    run_cli(main, ["--params", str(tmp_path / "params.yaml"), "--split", str(project["split"]),
                   "--frames", str(project["frames"].root), "--identity", str(project["identity"].root),
                   "--models", str(project["root"] / "models"), "--metrics", str(tmp_path / "m"),
                   "--reports", str(tmp_path / "r"), "--plots", str(tmp_path / "p"), "--device", "cpu"])
    written = json.loads((tmp_path / "m" / "bob.json").read_text())
    assert written["miou"] == pytest.approx(results["bob"]["miou"]) and "truth" not in written
    assert capsys.readouterr().out.startswith(f"evaluate: 2 models; best mIoU {results['bob']['miou']:.4f} (bob)")
    assert not (tmp_path / "p" / "qualitative.png").exists()  # grid_frames 0


def test_compare_shows_the_characters_figures_in_that_task():
    from charseg.compare import render

    def rev(name: str, task: str, miou: float) -> dict:
        return {"rev": name, "data": {
            "params": {"params.yaml": {"data": {"task": task, "models": {"unetpp": {"arch": "unetpp"}}}}},
            "metrics": {"metrics/evaluate/unetpp.json": {"data": {"miou": miou, "person_dice": 0.8}},
                        "dvclive/unetpp/metrics.json": {"data": {"best_val_miou": 0.4}}}}}
    lines = render([rev("workspace", "characters", 0.5), rev("a" * 40, "characters", 0.25)]).splitlines()
    assert lines[1].split() == ["experiment", "val", "mIoU", "pDice"]
    assert lines[2].split() == ["workspace", "0.400", "0.500", "0.800"]
    assert lines[3].split()[-3:] == ["0.400", "0.250", "0.800"]
