"""A user's own footage on a fresh `git clone`: the README's `make repro`, experiments and the remote.

The videos are made here and are not the sample: other sizes, frame rates, containers and character
names, one character with a single video and one with two. Everything runs through the commands a user
types (`make repro`, `dvc ...`, `charseg compare`), with HOME in a temporary folder so the
default remote (~/.cache/charseg/dvc-remote) is the test's own.
"""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from app_server import running_app
from pipeline_utils import clone_repo, dvc, git, make, stages_run, user_env

from charseg.layout import Layout

pytestmark = pytest.mark.slow

ALL_STAGES = {"frames", "eda", "masks", "identity", "split", "train@unetpp", "train@pspnet", "train@deeplabv3",
              "train@dinov2", "evaluate"}
# (character folder, file, fourcc, fps, (width, height), seconds): no name, size or rate of the sample.
CLIPS = (("Dana Scully", "pilot cold open.avi", "MJPG", 15.0, (112, 80), 7.0),
         ("Dana Scully", "s01e02.mp4", "mp4v", 24.0, (96, 72), 6.0),
         ("mulder", "one_long_take.mkv", "MJPG", 12.0, (128, 96), 14.0))
# Each character wears its own colours (BGR), so the identity stage can tell them apart by appearance.
COSTUMES = {"Dana Scully": (60, 160, 220), "mulder": (200, 70, 40)}
# What a user edits in params.yaml to run in CI's time: tiny images, one epoch, loaders in-process.
TINY = {"epochs": 1, "img_size": 32, "batch_size": 4, "train.workers": 0}
FROM_SCRATCH = {f"models.{m}.encoder_weights": None for m in ("unetpp", "pspnet", "deeplabv3", "dinov2")}


def make_own_footage(root: Path) -> None:
    """Videos under data/raw/videos and their exact masks under data/raw/masks (index.csv by video, frame)."""
    rows = []
    for n, (character, name, fourcc, fps, (width, height), seconds) in enumerate(CLIPS):
        path = root / "data/raw/videos" / character / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        assert writer.isOpened()
        rng = np.random.default_rng(n)
        for i in range(int(fps * seconds)):
            frame = np.full((height, width, 3), 40 + 10 * n, np.uint8)
            frame += rng.integers(0, 20, frame.shape, dtype=np.uint8)
            x = 8 + (i * 3) % (width - 40)
            mask = np.zeros((height, width), np.uint8)
            cv2.ellipse(mask, (x + 14, height // 2), (12, height // 3), 0, 0, 360, 255, -1)
            frame[mask > 0] = COSTUMES[character]
            writer.write(frame)
            mask_rel = f"{character}/{Path(name).stem}/{i:06d}.png"
            (root / "data/raw/masks" / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "data/raw/masks" / mask_rel), mask)
            rows.append({"video": f"{character}/{name}", "frame_index": i, "mask": mask_rel})
        writer.release()
    with open(root / "data/raw/masks/index.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["video", "frame_index", "mask"])
        writer.writeheader()
        writer.writerows(rows)


def set_params(root: Path, values: dict[str, object]) -> None:
    """Edit params.yaml as a user would (comments kept), through DVC's own YAML writer."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(root / "params.yaml") as params:
        for dotted, value in values.items():
            *parents, leaf = dotted.split(".")
            node = params
            for part in parents:
                node = node[part]
            node[leaf] = value


def commit_all(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)


def hashes(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        path = root / rel
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            out[file.relative_to(root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def manifest(root: Path, rel: str = "data/masks/manifest.csv") -> list[dict[str, str]]:
    with open(root / rel, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("own_footage")


@pytest.fixture(scope="module")
def env(tmp) -> dict[str, str]:
    (tmp / "home").mkdir(exist_ok=True)
    return user_env(tmp / "home")


@pytest.fixture(scope="module")
def imported(tmp, env) -> tuple[Path, subprocess.CompletedProcess]:
    """Scenario 1: fresh clone, own videos, own masks (labels.method: import), `make repro`."""
    repo = clone_repo(tmp, "imported")
    make_own_footage(repo)
    set_params(repo, {"labels.method": "import", **TINY, **FROM_SCRATCH})
    return repo, make(repo, "repro", env)


def test_fresh_clone_own_videos_and_masks_make_repro_runs_every_stage(imported, env):
    repo, run = imported
    assert run.returncode == 0, run.stdout + run.stderr
    assert stages_run(run.stdout) == ALL_STAGES
    assert "No file hash info found" not in run.stdout + run.stderr
    rows = manifest(repo)
    assert {r["character"] for r in rows} == {"Dana Scully", "mulder"}
    assert {r["status"] for r in rows} == {"labelled"}
    split = json.loads((repo / "data/split.json").read_text())
    assert split["train"] and split["val"]
    for name in ("unetpp", "pspnet", "deeplabv3", "dinov2"):
        assert (repo / "models" / name / "best.pt").is_file()
        assert 0 <= json.loads((repo / f"metrics/evaluate/{name}.json").read_text())["dice"] <= 1
    assert "up to date" in dvc(repo, "status", env=env).stdout
    again = make(repo, "repro", env)
    assert again.returncode == 0 and stages_run(again.stdout) == set(), again.stdout + again.stderr


def test_experiment_on_own_videos_and_compare_fits_a_terminal(imported, env):
    repo, _ = imported
    result = dvc(repo, "exp", "run", "-S", "lr=1e-5", env=env)
    assert stages_run(result.stdout) == ALL_STAGES - {"frames", "eda", "masks", "identity", "split"}
    shown = subprocess.run([sys.executable, "-m", "charseg", "compare"], cwd=repo, env={**env, "COLUMNS": "120"},
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    table, _, rest = shown.stdout.partition("\n\n")
    lines = table.splitlines()
    assert all(len(line.rstrip()) <= 120 for line in lines), table
    assert lines[0].split() == ["unetpp", "pspnet", "deeplabv3", "dinov2"]
    assert lines[1].split()[1:] == ["val", "dice", "bF1"] * 4
    workspace = next(line for line in lines if line.startswith("workspace")).split()[1:]
    evaluated = json.loads((repo / "metrics/evaluate/unetpp.json").read_text())
    trained = json.loads((repo / "dvclive/unetpp/metrics.json").read_text())
    assert workspace[:3] == [f"{trained['best_val_dice']:.3f}", f"{evaluated['dice']:.3f}",
                             f"{evaluated['boundary_f1']:.3f}"]
    assert any("lr=1e-05" in line for line in rest.splitlines())


def test_teammate_pulls_own_data_byte_identical_and_nothing_reruns(imported, env, tmp):
    repo, _ = imported
    # README "Share data and models": record the raw data, push, commit what the pipeline wrote.
    dvc(repo, "add", "data/raw", env=env)
    dvc(repo, "push", env=env)
    git(repo, "add", "dvc.lock", "params.yaml", "data/raw.dvc", "metrics", "plots", "dvclive", "reports")
    git(repo, "commit", "-q", "-m", "Own footage, labels and models")
    assert git(repo, "status", "--porcelain") == ""
    assert "up to date" in dvc(repo, "status", env=env).stdout
    outputs = ["data/raw/videos", "data/raw/masks", "data/frames", "data/masks", "data/split.json", "models"]
    expected = hashes(repo, outputs)
    assert any(k.startswith("models/dinov2/") for k in expected)

    git(tmp, "clone", "-q", str(repo), "teammate")
    mate = tmp / "teammate"
    dvc(mate, "pull", env=env)
    assert hashes(mate, outputs) == expected
    assert "up to date" in dvc(mate, "status", env=env).stdout
    assert stages_run(dvc(mate, "repro", env=env).stdout) == set()
    assert git(mate, "status", "--porcelain") == ""


def test_characters_task_on_own_videos_trains_evaluates_predicts_and_exports(imported, env, tmp):
    """Issue 14 on the user's footage: the folder names become classes, `dvc exp run -S task=characters` reruns
    only training and evaluate, and predict/export run the multi-class model on a clip it never saw."""
    repo, _ = imported
    identity = json.loads((repo / "metrics/identity.json").read_text())
    assert json.loads((repo / "data/identity/classes.json").read_text())["classes"] == \
        ["background", "Dana Scully", "mulder", "other"]
    assert identity["characters"]["Dana Scully"]["found_share"] >= 0.9, identity
    assert identity["characters"]["mulder"]["found_share"] >= 0.9, identity
    assert identity["characters"]["mulder"]["assigned_from_other_folders"] == 0, identity

    result = dvc(repo, "exp", "run", "-S", "task=characters", env=env)
    assert stages_run(result.stdout) == ALL_STAGES - {"frames", "eda", "masks", "identity", "split"}
    for name in ("unetpp", "pspnet", "deeplabv3", "dinov2"):
        scores = json.loads((repo / f"metrics/evaluate/{name}.json").read_text())
        assert 0 <= scores["miou"] <= 1 and 0 <= scores["person_dice"] <= 1, scores
        assert set(scores["iou_per_character"]) <= {"Dana Scully", "mulder"}
        assert "best_val_miou" in json.loads((repo / f"dvclive/{name}/metrics.json").read_text())
    assert "mIoU" in (repo / "reports/comparison.md").read_text()

    clip = tmp / "new_episode.avi"  # a clip no stage has seen: mulder walks in front of a new background
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 64))
    for i in range(12):
        frame = np.full((64, 96, 3), 70, np.uint8)
        cv2.ellipse(frame, (20 + 4 * i, 32), (10, 22), 0, 0, 360, COSTUMES["mulder"], -1)
        writer.write(frame)
    writer.release()
    charseg = [sys.executable, "-m", "charseg"]
    predicted = subprocess.run([*charseg, "predict", "--model", "unetpp", "--input", str(clip), "--output",
                                str(tmp / "new_episode_seg.mp4"), "--per-character"], cwd=repo, env=env,
                               capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    masks = sorted(p.name for p in (tmp / "new_episode_seg.masks").iterdir())
    assert "000000.png" in masks and "000000_mulder.png" in masks and "000000_Dana_Scully-e90d80.png" in masks, masks
    exported = subprocess.run([*charseg, "export", "--model", "pspnet", "--output", str(tmp / "pspnet.onnx")],
                              cwd=repo, env=env, capture_output=True, text=True)
    assert exported.returncode == 0 and (tmp / "pspnet.onnx").is_file(), exported.stderr


def test_app_shows_every_model_of_own_project_with_predicts_masks(imported, env, tmp):
    """Issue 16 on the user's project: `charseg app` in the clone lists the four trained models and segments one
    of the user's validation frames with each, mask for mask what `charseg predict` writes."""
    from gradio_client import Client, handle_file

    repo, _ = imported
    frame = Layout(repo).frames.image(json.loads((repo / "data/split.json").read_text())["val"][0])
    models = ["deeplabv3", "dinov2", "pspnet", "unetpp"]  # the page's order: its table, sorted by name
    with running_app(repo, env=env) as url:
        client = Client(url, verbose=False)
        table = client.predict(api_name="/reload")[0]
        assert [row[0] for row in table["data"]] == models, table
        _, masks, _, _ = client.predict(handle_file(str(frame)), models, 0.5, False, api_name="/segment_image")
    assert [m["caption"] for m in masks] == models
    for name, mask in zip(models, masks):
        out = tmp / f"app_predicted_{name}"
        done = subprocess.run([sys.executable, "-m", "charseg", "predict", "--model", name, "--input", str(frame),
                               "--output", str(out)], cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(cv2.imread(mask["image"], cv2.IMREAD_UNCHANGED),
                                      cv2.imread(str(out / f"{frame.stem}.mask.png"), cv2.IMREAD_UNCHANGED))


@pytest.fixture(scope="module")
def no_weights(tmp, env) -> tuple[Path, subprocess.CompletedProcess]:
    """Scenario 2: fresh clone, own videos, the default yolo_sam labeller, offline, no weight files."""
    repo = clone_repo(tmp, "no_weights")
    make_own_footage(repo)
    return repo, make(repo, "repro", env)


def test_no_weights_stops_at_masks_and_keeps_frames_and_eda(no_weights, env):
    repo, run = no_weights
    assert run.returncode != 0
    assert stages_run(run.stdout) == {"frames", "eda", "masks"}
    assert "error: YOLO weights file weights/yolov8s.pt not found (offline" in run.stderr
    assert not (repo / "data/masks").exists() and not (repo / ".cache/labels").exists()
    assert (repo / "data/frames/manifest.csv").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"frames", "eda"}
    again = make(repo, "repro", env)
    assert again.returncode != 0 and stages_run(again.stdout) == {"masks"}
    assert "Stage 'frames' didn't change" in again.stdout and "Stage 'eda' didn't change" in again.stdout


def _plant(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)) * 0.05 + 0.5


def lay_out_hf_cache(hub: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face hub cache holding random weights of the right shapes under the real repo names:
    smp's resnet34 ImageNet encoder at smp's pinned revision, and timm's DINOv2 ViT-S/14 (lvd142m)."""
    import segmentation_models_pytorch as smp
    import timm
    from safetensors.torch import save_file

    planted = {}
    settings = smp.encoders.encoders["resnet34"]["pretrained_settings"]["imagenet"]
    resnet = smp.encoders.get_encoder("resnet34", weights=None).state_dict()
    resnet = {k: _plant(v, 1) if k == "conv1.weight" else v for k, v in resnet.items()}
    planted["resnet34"] = resnet["conv1.weight"]
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict()
    vit = {k: _plant(v, 2) if k == "patch_embed.proj.weight" else v for k, v in vit.items()}
    planted["dinov2"] = vit["patch_embed.proj.weight"]
    for repo_id, revision, state, config in (
            (settings["repo_id"], settings["revision"], resnet,  # smp reads normalisation from config.json
             {"input_space": "RGB", "input_range": [0, 1], "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225]}),
            ("timm/vit_small_patch14_dinov2.lvd142m", "0" * 40, vit,
             {"architecture": "vit_small_patch14_dinov2"})):
        folder = hub / f"models--{repo_id.replace('/', '--')}"
        snapshot = folder / "snapshots" / revision
        snapshot.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
        (snapshot / "config.json").write_text(json.dumps(config))
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(revision)
    return planted


def test_weights_present_label_every_frame_and_train_on_cached_pretrained_encoders(no_weights, env, tmp):
    """Scenario 3: real-format weight files (random values) in weights/, pretrained encoders in the HF cache."""
    from segment_anything import sam_model_registry
    from ultralytics import YOLO

    repo, _ = no_weights
    (repo / "weights").mkdir(exist_ok=True)
    YOLO("yolov8n.yaml").save(str(repo / "weights/yolov8s.pt"))
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), repo / "weights/sam_vit_b_01ec64.pth")
    run = dvc(repo, "repro", "masks", env=env)
    assert stages_run(run.stdout) == {"masks"}
    rows, frames = manifest(repo), manifest(repo, "data/frames/manifest.csv")
    assert [r["id"] for r in rows] == [r["id"] for r in frames]
    assert all(r["status"] in {"labelled", "empty"} for r in rows)

    # A lighter SAM-family backend is one param away: it relabels every frame (its own cache key), and going
    # back to vit_b takes every label from the label cache.
    from ultralytics.models.sam.build import build_mobile_sam

    torch.save(build_mobile_sam().state_dict(), repo / "weights/mobile_sam.pt")
    run = dvc(repo, "exp", "run", "-S", "labels.sam.model=mobile_sam.pt", "masks", env=env)
    assert "masks" in stages_run(run.stdout)
    assert f"masks: {len(frames)} frames labelled now, 0 from the label cache" in run.stdout
    source = json.loads((repo / "data/masks/report.json").read_text())["source"]
    assert source["sam_model_type"] == "mobile_sam.pt"
    assert source["sam_sha256"] == hashlib.sha256((repo / "weights/mobile_sam.pt").read_bytes()).hexdigest()
    # Its encoder at 640^2 (issue 13's CPU lever) is a param too, and labels apart from 1024's.
    run = dvc(repo, "exp", "run", "-S", "labels.sam.model=mobile_sam.pt", "-S", "labels.sam.image_size=640", "masks",
              env=env)
    assert f"masks: {len(frames)} frames labelled now, 0 from the label cache" in run.stdout
    assert json.loads((repo / "data/masks/report.json").read_text())["source"]["sam_image_size"] == 640
    run = dvc(repo, "exp", "run", "-S", "labels.sam.model=vit_b", "-S", "labels.sam.image_size=1024", "masks",
              env=env)
    assert f"masks: 0 frames labelled now, {len(frames)} from the label cache" in run.stdout
    assert json.loads((repo / "data/masks/report.json").read_text())["source"]["sam_model_type"] == "vit_b"

    # The real encoder defaults (imagenet, lvd142m), offline, from the cache; own masks so there is a person.
    hub = tmp / "hf" / "hub"
    planted = lay_out_hf_cache(hub)
    set_params(repo, {"labels.method": "import", **TINY, "lr": 1e-9})
    cached_env = {**env, "HF_HUB_CACHE": str(hub)}
    run = dvc(repo, "repro", "train@unetpp", "train@dinov2", env=cached_env)
    assert {"train@unetpp", "train@dinov2"} <= stages_run(run.stdout)
    # A learning rate of 1e-9 moves no weight by more than ~1e-8: the checkpoint still holds what was planted.
    unetpp = torch.load(repo / "models/unetpp/best.pt", map_location="cpu", weights_only=False)["state_dict"]
    dinov2 = torch.load(repo / "models/dinov2/best.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.allclose(unetpp["encoder.conv1.weight"], planted["resnet34"], atol=1e-4)
    assert torch.allclose(dinov2["encoder.patch_embed.proj.weight"], planted["dinov2"], atol=1e-4)


def test_sample_first_then_own_videos_uses_the_real_defaults(tmp, env):
    """Scenario 4: the demo on the sample, then the user's own videos in the same checkout."""
    repo = clone_repo(tmp, "sample_then_own")
    # The user's committed settings (a tiny run for CI), and a demo profile shrunk the same way.
    set_params(repo, {"labels.method": "import", **TINY, **FROM_SCRATCH})
    profile = yaml.safe_load((repo / "params.sample.yaml").read_text())
    profile.update(epochs=1, img_size=32, batch_size=4)
    (repo / "params.sample.yaml").write_text(yaml.safe_dump(profile))
    commit_all(repo, "tiny settings")
    committed = (repo / "params.yaml").read_text()
    subprocess.run([sys.executable, "-m", "charseg", "sample", "--out", "data/raw", "--duration-scale", "0.3"],
                   cwd=repo, env=env, check=True, capture_output=True)
    demo = make(repo, "repro", env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "dvc exp run with the demo profile" in demo.stdout
    assert "data/raw/truth" in (repo / "params.yaml").read_text()

    removed = subprocess.run([sys.executable, "-m", "charseg", "sample", "--remove"], cwd=repo, env=env,
                             capture_output=True, text=True, check=True)
    assert "removed" in removed.stdout and not (repo / "data/raw/truth").exists()
    make_own_footage(repo)
    own = make(repo, "repro", env)
    assert own.returncode == 0, own.stdout + own.stderr
    assert "restored the committed params.yaml" in own.stdout
    assert (repo / "params.yaml").read_text() == committed
    assert {r["character"] for r in manifest(repo)} == {"Dana Scully", "mulder"}
    report = json.loads((repo / "data/masks/report.json").read_text())
    assert report["method"] == "import" and report["truth_dir"] is None
    assert "data/raw/masks" in json.dumps(report["source"]) and "data/raw/truth" not in json.dumps(report)
    for name in ("unetpp", "dinov2"):
        assert "truth" not in json.loads((repo / f"metrics/evaluate/{name}.json").read_text())
    split = json.loads((repo / "data/split.json").read_text())
    assert set(split["train"] + split["val"]) <= {r["id"] for r in manifest(repo, "data/frames/manifest.csv")}
