"""The evaluate stage on tiny data: models whose output is known exactly, so the scores can be checked
by hand; outputs, ranking, the exact-truth scores, and the errors a user can hit."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from charseg.config import EvaluateConfig, ModelConfig, TruthConfig
from charseg.evaluate import Frame, evaluate, grid_ids
from charseg.errors import CharsegError, run_cli
from charseg.io import read_csv, write_csv, write_json
from charseg.layout import FramesDir, MasksDir
from charseg.models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint
from stages.evaluate import main

HEIGHT, WIDTH, IMG_SIZE = 40, 56, 32  # frames neither square nor at img_size: predictions are resized back
VAL = [("alice", "alice/a.mp4", 0), ("alice", "alice/a.mp4", 30), ("bob", "bob/b.mkv", 0)]
MASK_BOXES = [(5, 10, 20, 30), (0, 0, 40, 8), (10, 20, 30, 50)]  # top, left, bottom, right per val frame
# A model that predicts foreground everywhere, one that predicts nothing.
CONSTANT_MODELS = {"everything": 20.0, "nothing": -20.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_project(root: Path) -> dict[str, Path]:
    frames, masks, truth = root / "frames" / "images", root / "masks" / "images", root / "truth"
    rng = np.random.default_rng(0)
    rows, truth_rows, val_ids = [], [], []
    for (character, video, index), (top, left, bottom, right) in zip(VAL, MASK_BOXES):
        frame_id = f"{character}--{Path(video).stem}--{index * 1000:08d}"
        val_ids.append(frame_id)
        frames.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(frames / f"{frame_id}.jpg"), rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[top:bottom, left:right] = 255
        cv2.imwrite(str(masks / f"{frame_id}.png"), mask)
        # The exact truth differs from the label on the first frame only: it is empty there.
        rel = f"{character}/{Path(video).stem}/{index:06d}.png"
        (truth / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(truth / rel), np.zeros_like(mask) if index == 0 and character == "alice" else mask)
        truth_rows.append({"video": video, "frame_index": index, "mask": rel})
        rows.append({"id": frame_id, "character": character, "video": video, "frame_index": index,
                     "timestamp": index / 30, "width": WIDTH, "height": HEIGHT})
    write_csv(root / "frames" / "manifest.csv", rows, list(rows[0]))
    write_csv(truth / "index.csv", truth_rows, ["video", "frame_index", "mask"])
    write_json(root / "split.json", {"train": ["some-train-frame"], "val": val_ids})
    return {"frames": FramesDir(root / "frames"), "masks": MasksDir(root / "masks"),
            "split": root / "split.json", "truth": truth}


def constant_checkpoint(path: Path, name: str, bias: float) -> dict:
    cfg = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}
    model = build_model(cfg)
    head = model.segmentation_head[0]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, bias)
    save_checkpoint(path / name / "best.pt", model, model_name=name, cfg=cfg, img_size=IMG_SIZE,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, epoch=1, val_dice=0.0)
    return cfg


def model_configs(cfgs: dict) -> dict[str, ModelConfig]:
    return {name: ModelConfig(name=name, arch=cfg["arch"], encoder=cfg.get("encoder"),
                              encoder_weights=cfg.get("encoder_weights"), encoder_lr_mult=1.0, params=cfg)
            for name, cfg in cfgs.items()}


def run(tmp_path: Path, project: dict[str, Path], cfgs: dict, truth: bool = False, **kwargs) -> dict:
    cfg = EvaluateConfig(boundary_tolerance_px=2, latency_warmup=1, grid_frames=4)
    return evaluate(model_configs(cfgs), cfg, split=project["split"], frames=project["frames"],
                    masks=project["masks"], models_dir=tmp_path / "models",
                    metrics_dir=tmp_path / "metrics" / "evaluate", reports_dir=tmp_path / "reports",
                    plots_dir=tmp_path / "plots" / "evaluate", device="cpu", progress=False,
                    truth=TruthConfig(project["truth"], "index.csv") if truth else None, **kwargs)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("evaluate")
    project = make_project(tmp_path)
    cfgs = {name: constant_checkpoint(tmp_path / "models", name, bias) for name, bias in CONSTANT_MODELS.items()}
    return tmp_path, project, cfgs, run(tmp_path, project, cfgs, truth=True)


def box_area(box: tuple[int, int, int, int]) -> int:
    top, left, bottom, right = box
    return (bottom - top) * (right - left)


def test_scores_match_hand_computed_values(evaluated):
    _, _, _, results = evaluated
    areas = [box_area(b) for b in MASK_BOXES]
    pixels = HEIGHT * WIDTH
    everything = results["everything"]
    assert everything["dice"] == pytest.approx(2 * sum(areas) / (sum(areas) + 3 * pixels))
    assert everything["iou"] == pytest.approx(sum(areas) / (3 * pixels))
    assert everything["dice_per_image"] == pytest.approx(np.mean([2 * a / (a + pixels) for a in areas]))
    assert everything["precision"] == pytest.approx(sum(areas) / (3 * pixels)) and everything["recall"] == 1.0
    assert everything["dice_per_character"] == pytest.approx(
        {"alice": 2 * sum(areas[:2]) / (sum(areas[:2]) + 2 * pixels), "bob": 2 * areas[2] / (areas[2] + pixels)})
    # The mask touching the left frame edge keeps its three inner sides as contour; the all-foreground
    # prediction has no contour at all (the frame edge is not a boundary), so its boundary F1 is 0.
    assert everything["boundary_f1"] == 0.0
    nothing = results["nothing"]
    assert (nothing["dice"], nothing["precision"], nothing["recall"], nothing["boundary_f1"]) == (0, 0, 0, 0)
    for result in results.values():
        assert result["frames"] == 3 and result["parameters_m"] > 0 and result["latency_ms"] > 0


def test_exact_truth_is_scored_separately(evaluated):
    _, _, _, results = evaluated
    areas = [box_area(b) for b in MASK_BOXES]
    truth = results["everything"]["truth"]
    # The truth of the first frame is empty, so only frames 2 and 3 hold foreground.
    assert truth["dice"] == pytest.approx(2 * sum(areas[1:]) / (sum(areas[1:]) + 3 * HEIGHT * WIDTH))
    assert truth["dice"] < results["everything"]["dice"]
    # "nothing" is right on the empty-truth frame: per-image Dice 1 there, 0 on the two others.
    assert results["nothing"]["truth"]["dice_per_image"] == pytest.approx(1 / 3)


def test_outputs_are_written_and_ranked_by_dice(evaluated):
    tmp_path, _, _, results = evaluated
    for name, result in results.items():
        written = json.loads((tmp_path / "metrics" / "evaluate" / f"{name}.json").read_text())
        assert written == result

        def numbers_only(value):
            return all(numbers_only(v) for v in value.values()) if isinstance(value, dict) else \
                isinstance(value, (int, float)) and not isinstance(value, bool)
        assert numbers_only(written)
    rows = read_csv(tmp_path / "reports" / "comparison.csv")
    assert [r["model"] for r in rows] == ["everything", "nothing"]
    assert float(rows[0]["dice"]) == pytest.approx(results["everything"]["dice"])
    assert {"dice[alice]", "dice[bob]", "truth_dice", "latency_ms", "parameters_m"} <= set(rows[0])
    report = (tmp_path / "reports" / "comparison.md").read_text()
    assert report.index("| 1 | everything") < report.index("| 2 | nothing") and "exact ground truth" in report
    plots = {p.name for p in (tmp_path / "plots" / "evaluate").iterdir()}
    assert plots == {"metrics.png", "dice_per_character.png", "qualitative.png"}
    assert not any(name.startswith(".") for name in plots)
    grid = cv2.imread(str(tmp_path / "plots" / "evaluate" / "qualitative.png"))
    assert grid is not None and grid.shape[0] > 100


def test_grid_frames_spread_over_characters():
    frames = [Frame(f"a{i}", "alice", "v", i) for i in range(10)] + [Frame("b0", "bob", "w", 0)]
    assert grid_ids(frames, 3) == ["a0", "a9", "b0"]
    assert grid_ids(frames, 4) == ["a0", "a4", "a9", "b0"]  # bob has no second frame: alice gets it
    assert grid_ids(frames, 1) == ["a0"]
    assert grid_ids(frames, 0) == []
    assert len(grid_ids(frames, 50)) == 11


def test_user_errors(evaluated, tmp_path):
    base, project, cfgs, _ = evaluated
    with pytest.raises(CharsegError, match=r"holds a 'pspnet' model but params.yaml says arch 'unetpp'"):
        run(base, project, {"everything": {**cfgs["everything"], "arch": "unetpp"}})
    with pytest.raises(CharsegError, match=r"dvc repro train@absent"):
        run(base, project, {"absent": cfgs["everything"]})
    index = read_csv(project["truth"] / "index.csv")
    moved = tmp_path / "truth"
    moved.mkdir()
    write_csv(moved / "index.csv", index[:2], list(index[0]))
    with pytest.raises(CharsegError, match=r"no mask for 1 validation frame\(s\) \(e.g. bob/b.mkv frame 0\)"):
        run(base, {**project, "truth": moved}, cfgs, truth=True)


def test_main_reads_params_and_fails_cleanly_on_a_missing_checkpoint(evaluated, tmp_path, capsys):
    _, project, _, _ = evaluated
    (tmp_path / "params.yaml").write_text(
        "models:\n  unetpp: {arch: unetpp, encoder: resnet18, encoder_weights: null}\n"
        "evaluate: {boundary_tolerance_px: 2, latency_warmup: 0, grid_frames: 2}\n"
        "labels: {truth_dir: null, mask_index: index.csv}\ntask: person\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--params", str(tmp_path / "params.yaml"), "--split", str(project["split"]),
                       "--frames", str(project["frames"].root), "--masks", str(project["masks"].root),
                       "--models", str(tmp_path / "models"),
                       "--metrics", str(tmp_path / "m"), "--reports", str(tmp_path / "r"),
                       "--plots", str(tmp_path / "p"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "train@unetpp" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_main_takes_the_truth_from_labels_truth_dir(evaluated, tmp_path, capsys):
    base, project, _, results = evaluated
    (tmp_path / "params.yaml").write_text(
        "models:\n" + "".join(f"  {name}: {{arch: pspnet, encoder: resnet18, encoder_weights: null, "
                              f"psp_out_channels: 16}}\n" for name in CONSTANT_MODELS) +
        "evaluate: {boundary_tolerance_px: 2, latency_warmup: 1, grid_frames: 0}\n"
        f"labels: {{truth_dir: {project['truth']}, mask_index: index.csv}}\ntask: person\n")
    run_cli(main, ["--params", str(tmp_path / "params.yaml"), "--split", str(project["split"]),
                   "--frames", str(project["frames"].root), "--masks", str(project["masks"].root),
                   "--models", str(base / "models"), "--metrics", str(tmp_path / "m"), "--reports", str(tmp_path / "r"),
                   "--plots", str(tmp_path / "p"), "--device", "cpu"])
    written = json.loads((tmp_path / "m" / "everything.json").read_text())
    assert written["truth"]["dice"] == pytest.approx(results["everything"]["truth"]["dice"])
    assert capsys.readouterr().out.startswith("evaluate: 2 models; best Dice ")
