"""Generate a small synthetic "TV show" with exact person masks, so the pipeline runs without your videos.

    charseg sample --out data/raw [--seed 0] [--if-empty]
    charseg sample --remove                         # make room for your own videos
    charseg sample --repro params.sample.yaml       # what `make repro` runs

Writes `<out>/videos/<character>/<clip>` and the ground truth of every frame: the person mask
`<out>/truth/<character>/<clip stem>/<frame_index:06d>.png` (0/255, union of all figures) and the
per-character mask `<frame_index:06d>_characters.png` beside it (uint8: 0 nobody, else the value of the
figure's character in `<out>/truth/characters.json`, {"Zoë": 1, "alice": 2, "bob": 3, "other": 4}; the
nearer figure's value where figures overlap), both listed in `<out>/truth/index.csv`
(video,frame_index,mask,character_mask). The person mask is exactly (character mask > 0).

Each named character has one look (costume colours and pattern, from the seed and its name) in all its
clips; passers-by ("other") get new looks every time. Every scene shows the folder's character; in about
a third of the scenes another named character (a guest, with its own look) shares the frame, and every
character is a guest at least once, so identity can be checked on frames with several characters.

The clips imitate what breaks naive pipelines: 23.976/25/29.97 fps, 4:3 and 16:9 frame sizes, .mp4 and .mov
(MPEG-4 part 2) and .avi (Motion JPEG) containers, a non-ASCII character name and a file name with a
space, a black first frame, a hard scene cut, a slowly panning camera, frames with nobody in them, and
one character with a single long clip (so `split` must cut it into time blocks). The figures are
person-shaped (head, torso, swinging limbs) with their own clothing textures, over rooms drawn with
similar colours, so a segmentation model has to learn shape and texture rather than one colour.

Everything is a pure function of the seed: the same seed gives byte-identical videos and truth PNGs.
Textures are smooth (gradients, stripes, low-frequency noise) so the whole sample stays around 4 MB.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from charseg.errors import CharsegError
from charseg.config import PARAMS_FILE, flatten, load_params, parse_yaml
from charseg.io import atomic_dir, imwrite_atomic, write_csv, write_json, write_text_atomic
from charseg.labels.imported import CHARACTERS_FILE
from charseg.layout import OTHER, PROJECT
from charseg.video import is_video_file

# .mkv/.webm are not used: ffmpeg's Matroska muxer writes random UIDs, so the bytes would differ per run.
FOURCC = {".mp4": "mp4v", ".avi": "MJPG", ".mov": "mp4v"}
PNG_1BIT = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 9]  # reads back as 0/255 uint8
# Run-length zlib: a few % larger than the default strategy on flat value maps, but 4x faster to write.
PNG_VALUES = [cv2.IMWRITE_PNG_COMPRESSION, 9, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
CHARACTER_MASK_SUFFIX = "_characters.png"  # <frame_index:06d>_characters.png beside the 0/255 mask
MARKER = ".charseg-sample.json"  # in <out>/videos: tells a generated sample from the user's own videos


@dataclass(frozen=True)
class ClipSpec:
    character: str
    filename: str
    fps: float
    size: tuple[int, int]  # width, height
    seconds: float
    black_first_frame: bool


CLIPS = (
    ClipSpec("alice", "clip_01.mp4", 30000 / 1001, (320, 240), 8.0, True),
    ClipSpec("alice", "clip_02.avi", 25.0, (240, 180), 5.0, False),
    ClipSpec("bob", "clip_01.mp4", 24000 / 1001, (384, 216), 7.0, True),
    ClipSpec("bob", "scene 2.mov", 25.0, (320, 180), 6.0, False),
    ClipSpec("Zoë", "long_take.mp4", 24000 / 1001, (352, 264), 28.0, True),
)

# Figure labels drawn into a patch; the union of non-zero labels is the person mask.
SKIN, SHIRT, TROUSERS = 1, 2, 3

# Pixel value of each character in the per-character truth (characters.json): the named characters (the
# folder names) in sorted order from 1, then `other` for every passer-by.
NAMED_CHARACTERS = tuple(sorted({spec.character for spec in CLIPS}))
CHARACTER_VALUES = {**{name: value for value, name in enumerate(NAMED_CHARACTERS, start=1)},
                    OTHER: len(NAMED_CHARACTERS) + 1}
SCENES_PER_CLIP = 2  # each clip has one hard cut


def _colour(rng: np.random.Generator, sat: tuple[int, int] = (40, 200),
            val: tuple[int, int] = (60, 230)) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(*sat), rng.integers(*val)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Values in [0, 1] varying over about `cells` blobs along the longer side."""
    longest = max(height, width)
    grid = rng.random((max(2, cells * height // longest), max(2, cells * width // longest)))
    noise = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(noise, 0, 1)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A two-colour fabric/wallpaper pattern: stripes, diagonal stripes, checks or blotches."""
    a, b = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = float(rng.uniform(6, 16))
    kind = rng.integers(0, 4)
    if kind == 0:
        weight = 0.5 + 0.5 * np.sin(2 * np.pi * yy / period)
    elif kind == 1:
        weight = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy) / period)
    elif kind == 2:
        weight = ((xx // period + yy // period) % 2).astype(np.float32)
    else:
        weight = _smooth_noise(rng, height, width, 6)
    return a * weight[..., None] + b * (1 - weight[..., None])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A room: shaded wall (maybe wallpaper), floor with boards, windows, furniture, a lamp."""
    wall = _colour(rng) * (0.7 + 0.5 * _smooth_noise(rng, height, width, 8))[..., None]
    if rng.random() < 0.6:
        xx = np.arange(width, dtype=np.float32)
        wall *= (0.9 + 0.1 * np.sin(2 * np.pi * xx / rng.uniform(10, 40)))[None, :, None]
    image = wall
    floor_top = int(height * rng.uniform(0.65, 0.8))
    floor = _colour(rng, val=(50, 180)) * np.linspace(0.8, 1.2, height - floor_top)[:, None, None]
    image[floor_top:] = np.broadcast_to(floor, (height - floor_top, width, 3))
    board = int(rng.integers(12, 30))
    image[floor_top::board // 2] *= 0.8
    for _ in range(int(rng.integers(3, 7))):
        w, h = int(rng.uniform(0.1, 0.3) * height), int(rng.uniform(0.15, 0.45) * height)
        x, y = int(rng.integers(0, max(1, width - w))), int(rng.integers(0, max(1, floor_top - h // 2)))
        kind = rng.integers(0, 3)
        panel = image[y:y + h, x:x + w]  # may be cut by the bottom edge
        if kind == 0:  # window: sky gradient in a frame
            sky = np.linspace(_colour(rng, sat=(40, 120), val=(180, 255)), np.full(3, 235.0), h)
            panel[:] = sky[:panel.shape[0], None, :]
            cv2.rectangle(image, (x, y), (x + w, y + h), _colour(rng).tolist(), 3)
        elif kind == 1:  # cupboard / picture: patterned panel
            panel[:] = _texture(rng, *panel.shape[:2])
        else:  # sofa / round table: person-like colours and curves, so colour alone is not enough
            cv2.ellipse(image, (x + w // 2, floor_top), (w, h // 3), 0, 180, 360, _colour(rng).tolist(), -1)
    if rng.random() < 0.5:  # standing lamp: a head-sized disc on a stick
        x = int(rng.integers(0, width))
        cv2.line(image, (x, floor_top), (x, int(height * 0.35)), _colour(rng, val=(30, 90)).tolist(), 3)
        cv2.circle(image, (x, int(height * 0.32)), int(height * 0.05), _colour(rng).tolist(), -1)
    return np.clip(image, 0, 255).astype(np.uint8)


@dataclass
class Figure:
    """One person: looks (texture patches) plus where it is at each time."""
    height: float
    patches: np.ndarray  # (4, ph, pw, 3) uint8: unused, skin (with hair), shirt, trousers
    start_x: float       # screen x of the figure's centre at t_enter
    speed: float         # px per second (0 = standing, swaying)
    feet_y: float
    t_enter: float
    t_leave: float
    phase: float
    value: int           # CHARACTER_VALUES of who this is, written into the per-character truth

    def draw(self, t: float, frame: np.ndarray, values: np.ndarray) -> None:
        """Paint the figure at time t into frame, and its value into the per-character map `values`."""
        if not self.t_enter <= t < self.t_leave:
            return
        h = self.height
        _, ph, pw, _ = self.patches.shape
        walking = self.speed != 0
        step = 2 * np.pi * (1.6 if walking else 0.4) * t + self.phase
        swing = math.sin(step) * (24 if walking else 6)
        label = np.zeros((ph, pw), np.uint8)
        cx, top = pw / 2, 2 + (abs(math.sin(step)) * 0.015 * h if walking else 0)

        def limb(px: float, py: float, length: float, width: float, angle: float, value: int) -> None:
            rad = math.radians(angle)
            centre = (px + math.sin(rad) * length / 2, py + math.cos(rad) * length / 2)
            cv2.ellipse(label, (round(centre[0]), round(centre[1])), (round(width), round(length / 2)),
                        -angle, 0, 360, value, -1)

        hip, shoulder = top + 0.55 * h, top + 0.21 * h
        limb(cx - 0.05 * h, hip, 0.43 * h, 0.05 * h, swing, TROUSERS)          # back leg
        limb(cx + 0.11 * h, shoulder, 0.34 * h, 0.035 * h, swing * 0.8, SHIRT)  # back arm
        cv2.ellipse(label, (round(cx), round(top + 0.37 * h)), (round(0.12 * h), round(0.2 * h)), 0, 0, 360, SHIRT, -1)
        cv2.ellipse(label, (round(cx), round(hip)), (round(0.11 * h), round(0.07 * h)), 0, 0, 360, TROUSERS, -1)
        limb(cx + 0.05 * h, hip, 0.43 * h, 0.05 * h, -swing, TROUSERS)          # front leg
        limb(cx - 0.11 * h, shoulder, 0.34 * h, 0.035 * h, -swing * 0.8, SHIRT)  # front arm
        cv2.ellipse(label, (round(cx), round(top + 0.09 * h)), (round(0.075 * h), round(0.09 * h)), 0, 0, 360, SKIN, -1)

        x = self.start_x + self.speed * (t - self.t_enter) + (0 if walking else 3 * math.sin(step))
        x0, y0 = round(x - pw / 2), round(self.feet_y - (ph - 2))
        fh, fw = values.shape
        sx0, sy0, sx1, sy1 = max(0, -x0), max(0, -y0), min(pw, fw - x0), min(ph, fh - y0)
        if sx0 >= sx1 or sy0 >= sy1:
            return
        crop = label[sy0:sy1, sx0:sx1]
        inside = crop > 0
        region = frame[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1]
        rows, cols = np.nonzero(inside)
        region[inside] = self.patches[crop[inside], rows + sy0, cols + sx0]
        values[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1][inside] = self.value


_LOOKS_HEIGHT = 120  # looks are drawn once at this figure height and resized, so a character is recognisable


def _looks(rng: np.random.Generator) -> np.ndarray:
    """Texture patches (unused, skin with hair, shirt, trousers) for a figure of _LOOKS_HEIGHT px."""
    height = _LOOKS_HEIGHT
    ph, pw = int(1.05 * height) + 4, int(0.75 * height) + 4
    skin_tone = np.array([rng.uniform(60, 190), rng.uniform(90, 200), rng.uniform(150, 235)], np.float32)
    shade = np.linspace(1.1, 0.8, ph, dtype=np.float32)[:, None, None]
    skin = np.broadcast_to(skin_tone * shade, (ph, pw, 3)).copy()
    skin[: int(0.06 * height) + 2] = _colour(rng, sat=(20, 120), val=(20, 110))  # hair
    shirt = _texture(rng, ph, pw) * shade
    trousers = _colour(rng, val=(30, 160)) * (0.8 + 0.3 * _smooth_noise(rng, ph, pw, 4))[..., None]
    return np.clip(np.stack([np.zeros_like(skin), skin, shirt, trousers]), 0, 255).astype(np.uint8)


def _sized(looks: np.ndarray, height: float) -> np.ndarray:
    size = (int(0.75 * height) + 4, int(1.05 * height) + 4)
    return np.stack([cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR) for patch in looks])


def character_looks(seed: int, character: str) -> np.ndarray:
    """A named character's looks: the same in every clip of the sample, whoever's clip it appears in."""
    return _looks(np.random.default_rng([seed, zlib.crc32(character.encode("utf-8"))]))


_GUEST_STREAM = zlib.crc32(b"guests")  # seeds the guests' random numbers apart from the clips' own


def guest_plan(seed: int) -> dict[tuple[int, int], str]:
    """(clip number in CLIPS, scene number) -> the named character who guests in that scene.

    Each named character guests in one scene of another character's clip, no scene has two guests: 3 of
    the sample's 10 scenes, so identity meets frames with two named characters without them dominating.
    """
    rng = np.random.default_rng([seed, _GUEST_STREAM])
    plan: dict[tuple[int, int], str] = {}
    for name in NAMED_CHARACTERS:
        free = [(clip_no, scene_no) for clip_no, spec in enumerate(CLIPS) if spec.character != name
                for scene_no in range(SCENES_PER_CLIP) if (clip_no, scene_no) not in plan]
        plan[free[int(rng.integers(len(free)))]] = name
    return plan


def _guest(rng: np.random.Generator, looks: np.ndarray, value: int, main: Figure, width: int, height: int,
           start: float, length: float) -> Figure:
    """A named character in someone else's scene: a little smaller and farther than the main figure (which
    stays the scene's main figure), standing beside it or walking through most of the scene."""
    guest_h = height * rng.uniform(0.5, 0.68)
    patches = _sized(looks, guest_h)
    pw = patches.shape[2]
    feet_y = height * rng.uniform(0.86, 0.95)  # between the passer-by (0.75-0.85) and the main figure
    if rng.random() < 0.5:
        side = (0.12 if main.start_x > width / 2 else 0.88) if main.speed == 0 else rng.uniform(0.2, 0.8)
        return Figure(guest_h, patches, width * (side + rng.uniform(-0.05, 0.05)), 0.0, feet_y,
                      start, start + length, rng.uniform(0, 6.3), value)
    direction = 1 if rng.random() < 0.5 else -1
    t_enter = start + length * rng.uniform(0.0, 0.1)
    crossing = length * rng.uniform(0.7, 0.85)
    return Figure(guest_h, patches, -pw / 2 if direction > 0 else width + pw / 2,
                  direction * (width + pw) / crossing, feet_y, t_enter, t_enter + crossing, rng.uniform(0, 6.3), value)


def _figures(rng: np.random.Generator, main_looks: np.ndarray, main_value: int, width: int, height: int,
             start: float, length: float) -> list[Figure]:
    """The character (walking through, or standing in shot all scene) and maybe one passer-by."""
    main_h = height * rng.uniform(0.6, 0.85)
    main_patches = _sized(main_looks, main_h)
    pw = main_patches.shape[2]
    figures = []
    if rng.random() < 0.6:
        direction = 1 if rng.random() < 0.5 else -1
        t_enter = start + length * rng.uniform(0.08, 0.2)
        crossing = length * rng.uniform(0.55, 0.72)
        speed = direction * (width + pw) / crossing
        start_x = -pw / 2 if direction > 0 else width + pw / 2
        figures.append(Figure(main_h, main_patches, start_x, speed, height * rng.uniform(0.92, 1.05),
                              t_enter, t_enter + crossing, rng.uniform(0, 6.3), main_value))
    else:
        figures.append(Figure(main_h, main_patches, width * rng.uniform(0.3, 0.7), 0.0,
                              height * rng.uniform(0.95, 1.1), start, start + length, rng.uniform(0, 6.3),
                              main_value))
    if rng.random() < 0.7:
        extra_h = height * rng.uniform(0.35, 0.55)
        patches = _sized(_looks(rng), extra_h)
        epw = patches.shape[2]
        direction = 1 if rng.random() < 0.5 else -1
        t_enter = start + length * rng.uniform(0.1, 0.5)
        crossing = length * rng.uniform(0.3, 0.45)
        figures.insert(0, Figure(extra_h, patches, -epw / 2 if direction > 0 else width + epw / 2,
                                 direction * (width + epw) / crossing, height * rng.uniform(0.75, 0.85),
                                 t_enter, t_enter + crossing, rng.uniform(0, 6.3), CHARACTER_VALUES[OTHER]))
    return figures  # farther (smaller) figure first, so the nearer one occludes it


def render_clip_characters(spec: ClipSpec, seed: int, clip_no: int,
                           duration_scale: float = 1.0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (BGR frame, uint8 per-character mask of CHARACTER_VALUES) for every frame of one clip."""
    rng = np.random.default_rng([seed, clip_no])
    width, height = spec.size
    n_frames = max(4, round(spec.seconds * duration_scale * spec.fps))
    duration = n_frames / spec.fps
    cut = n_frames // 2
    # The named characters look the same in every clip; the passers-by do not.
    main_looks = character_looks(seed, spec.character)
    guests = guest_plan(seed)
    scenes = []
    for scene_no, (scene_start, scene_len) in enumerate(((0.0, cut / spec.fps),
                                                         (cut / spec.fps, duration - cut / spec.fps))):
        pan_speed = rng.uniform(6, 16) * (1 if rng.random() < 0.5 else -1)
        background = _background(rng, height, width + math.ceil(abs(pan_speed) * scene_len) + 2)
        figures = _figures(rng, main_looks, CHARACTER_VALUES[spec.character], width, height, scene_start, scene_len)
        guest = guests.get((clip_no, scene_no))
        if guest:  # its own random numbers, so the scene's other figures are those of a scene without guest
            guest_rng = np.random.default_rng([seed, _GUEST_STREAM, clip_no, scene_no])
            figures.insert(-1, _guest(guest_rng, character_looks(seed, guest), CHARACTER_VALUES[guest],
                                      figures[-1], width, height, scene_start, scene_len))  # behind the main one
        scenes.append((scene_start, pan_speed, background, figures))
    for index in range(n_frames):
        frame, values = np.zeros((height, width, 3), np.uint8), np.zeros((height, width), np.uint8)
        if index > 0 or not spec.black_first_frame:
            t = index / spec.fps
            scene_start, pan_speed, background, figures = scenes[0 if index < cut else 1]
            offset = round(abs(pan_speed) * (t - scene_start)) if pan_speed > 0 else \
                background.shape[1] - width - round(abs(pan_speed) * (t - scene_start))
            frame[:] = background[:, offset:offset + width]
            for figure in figures:  # far to near: the nearer figure's value wins where they overlap
                figure.draw(t, frame, values)
        yield frame, values


def render_clip(spec: ClipSpec, seed: int, clip_no: int,
                duration_scale: float = 1.0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (BGR frame, 0/255 person mask: the union of all figures) for every frame of one clip."""
    for frame, values in render_clip_characters(spec, seed, clip_no, duration_scale):
        yield frame, person_mask(values)


def person_mask(values: np.ndarray) -> np.ndarray:
    """The 0/255 person mask of a per-character mask: every figure, whoever it is."""
    return (values > 0).astype(np.uint8) * 255


def generate(out_root: Path, seed: int = 0, duration_scale: float = 1.0) -> list[Path]:
    """Write the sample videos and truth under `out_root`; returns the video paths.

    `duration_scale` shortens every clip (tests use ~0.05; a clip keeps at least 4 frames). `videos/` is
    replaced only after everything was written (it is renamed into place last), so an interrupted run
    leaves no sample that looks complete. A `videos/` holding anything but a previous sample is refused.
    """
    out_root = Path(out_root)
    videos_dir = out_root / "videos"
    user_files = [p for p in videos_dir.rglob("*") if p.is_file()]
    if user_files and not (videos_dir / MARKER).is_file():
        raise CharsegError(f"{videos_dir} holds files that are not a generated sample (e.g. {user_files[0]}): "
                           f"refusing to replace them: give the sample another --out, or move those files away")
    index_rows, written = [], []
    with atomic_dir(videos_dir) as videos_tmp, atomic_dir(out_root / "truth") as truth_tmp:
        for clip_no, spec in enumerate(CLIPS):
            rel = Path(spec.character) / spec.filename
            path = videos_tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[path.suffix]), spec.fps, spec.size)
            if not writer.isOpened():
                raise CharsegError(f"this OpenCV build cannot write {path.suffix} ({FOURCC[path.suffix]}) video")
            try:
                frames = render_clip_characters(spec, seed, clip_no, duration_scale)
                for index, (frame, values) in enumerate(frames):
                    writer.write(frame)
                    mask_rel = Path(spec.character) / Path(spec.filename).stem / f"{index:06d}.png"
                    characters_rel = mask_rel.with_name(f"{index:06d}{CHARACTER_MASK_SUFFIX}")
                    (truth_tmp / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                    imwrite_atomic(truth_tmp / mask_rel, person_mask(values), PNG_1BIT)
                    imwrite_atomic(truth_tmp / characters_rel, values, PNG_VALUES)
                    index_rows.append({"video": rel.as_posix(), "frame_index": index, "mask": mask_rel.as_posix(),
                                       "character_mask": characters_rel.as_posix()})
            finally:
                writer.release()
            written.append(videos_dir / rel)
        write_csv(truth_tmp / "index.csv", index_rows, ["video", "frame_index", "mask", "character_mask"])
        write_json(truth_tmp / CHARACTERS_FILE, CHARACTER_VALUES)
        write_json(videos_tmp / MARKER, {"generator": "charseg sample", "seed": seed, "duration_scale": duration_scale})
    return written


def demo_overrides(profile: Path = Path("params.sample.yaml")) -> list[str]:
    """The profile's nested keys as `-S key=value` arguments for `dvc exp run`."""
    def shown(value: object) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return [arg for key, value in flatten(load_params(profile)) for arg in ("-S", f"{key}={shown(value)}")]


def sample_files(videos_dir: Path) -> tuple[list[Path], list[Path]]:
    """(the generated sample's videos found in videos_dir, every other file there); no marker: no sample."""
    files = sorted(p for p in videos_dir.rglob("*") if p.is_file()) if videos_dir.is_dir() else []
    if not (videos_dir / MARKER).is_file():
        return [], files
    generated = {videos_dir / spec.character / spec.filename for spec in CLIPS} | {videos_dir / MARKER}
    return [p for p in files if p in generated], [p for p in files if p not in generated]


def demo_profile_leftover(params_file: Path, profile: Path, committed_text: str | None) -> str | None:
    """What to do about a demo profile left in params.yaml by an earlier sample run, for own footage.

    Returns None when params.yaml does not hold the whole demo profile. When it does and it differs from
    the committed params.yaml (`committed_text`) in the profile's keys only, params.yaml is restored to the
    committed text and a line saying so is returned. Any other edit beside the profile: refused, since
    restoring would lose it.
    """
    current = dict(flatten(load_params(params_file)))
    demo = dict(flatten(load_params(profile)))
    if any(current.get(key, object()) != value for key, value in demo.items()):
        return None
    committed = dict(flatten(parse_yaml(committed_text))) if committed_text else {}
    how = (f"the sample's demo profile ({', '.join(f'{k}={v}' for k, v in list(demo.items())[:4])}, ...) "
           f"is still in {params_file}, but data/raw/videos holds your own footage: it would train your "
           f"videos at the demo's tiny size against the sample's masks")
    changed = {key for key in current.keys() | committed.keys() if current.get(key) != committed.get(key)}
    if not committed:
        raise CharsegError(f"{how}; params.yaml is not committed in git, so it cannot be restored from there: "
                           f"set those keys back to the real defaults, then run make repro again")
    if not changed or all(committed.get(key) == demo[key] for key in demo):
        raise CharsegError(f"{how}; the committed params.yaml holds it too: put the real defaults back "
                           f"(e.g. `git checkout <an earlier commit> -- params.yaml`), then run make repro again")
    if not changed <= demo.keys():
        raise CharsegError(f"{how}; params.yaml has other edits too ({', '.join(sorted(changed - demo.keys())[:3])}), "
                           f"so it is not restored automatically: `git diff params.yaml` shows them; "
                           f"`git checkout params.yaml` restores the committed defaults. Then run make repro again")
    write_text_atomic(params_file, committed_text)
    return (f"repro: params.yaml held the sample's demo profile ({len(demo)} keys) and data/raw/videos now holds "
            f"your own footage: restored the committed params.yaml, so this run uses its real defaults")


def _committed(path: Path) -> str | None:
    """The file's text at git HEAD, or None outside git or when it is not committed."""
    try:
        proc = subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent if path.parent.parts else None,
                              capture_output=True, check=False)
    except OSError:
        return None
    return proc.stdout.decode("utf-8") if proc.returncode == 0 else None


HASH_INFO_NOTE = ("repro: DVC's 'No file hash info found for ... It won't be created.' warnings name outputs of "
                  "stages that have not run yet in this checkout: harmless, this run builds them")


def repro_command(videos_dir: Path, params_file: Path, profile: Path) -> list[str]:
    """The command `make repro` runs: the demo experiment on the sample, else plain `dvc repro`."""
    ours, others = sample_files(videos_dir)
    if ours and others:
        raise CharsegError(f"{videos_dir} mixes the generated sample with other files (e.g. {others[0]}): the "
                           f"pipeline would train on both. Remove the sample (`charseg sample --remove`) "
                           f"to use your own videos, or move yours away to run the demo")
    if ours:
        print(f"repro: {videos_dir} holds the generated sample: dvc exp run with the demo profile of {profile}")
        print(HASH_INFO_NOTE)
        return ["dvc", "exp", "run", *demo_overrides(profile)]
    note = demo_profile_leftover(params_file, profile, _committed(params_file))
    if note:
        print(note)
    return ["dvc", "repro"]


def remove_sample(out_root: Path) -> list[Path]:
    """Delete the generated sample's videos, marker and truth; any other file is left alone."""
    videos_dir = out_root / "videos"
    ours, _ = sample_files(videos_dir)
    for path in ours:
        path.unlink()
    for folder in sorted({p.parent for p in ours}, key=lambda p: len(p.parts), reverse=True):
        if folder != videos_dir and not any(folder.iterdir()):
            folder.rmdir()
    truth = out_root / "truth"
    if ours and truth.is_dir():
        shutil.rmtree(truth)
    return ours


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT.raw, help="writes <out>/videos and <out>/truth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration-scale", type=float, default=1.0, help="clip length factor (1 = full sample)")
    parser.add_argument("--if-empty", action="store_true",
                        help="do nothing when <out>/videos already holds a video (yours or a sample)")
    parser.add_argument("--print-overrides", type=Path, metavar="PROFILE",
                        help="print PROFILE (params.sample.yaml) as `-S key=value` arguments for dvc exp run, and exit")
    parser.add_argument("--repro", type=Path, metavar="PROFILE",
                        help="what `make repro` runs: the demo experiment with PROFILE when <out>/videos holds only "
                             "the sample, else `dvc repro` (a demo profile left in params.yaml is undone first)")
    parser.add_argument("--remove", action="store_true",
                        help="delete the generated sample (its videos and truth) from <out>, keeping any other file")
    args = parser.parse_args(argv)
    if args.print_overrides:
        print(" ".join(demo_overrides(args.print_overrides)))
        return
    if args.repro:
        command = repro_command(args.out / "videos", PARAMS_FILE, args.repro)
        os.execvp(command[0], command)
    if args.remove:
        removed = remove_sample(args.out)
        print(f"sample: removed {len(removed)} files of the generated sample from {args.out}" if removed else
              f"sample: {args.out / 'videos'} holds no generated sample; nothing removed")
        return
    if not 0 < args.duration_scale <= 10:
        raise CharsegError(f"--duration-scale must be in (0, 10], got {args.duration_scale}")
    videos_dir = args.out / "videos"
    if args.if_empty and videos_dir.is_dir() and any(is_video_file(p) for p in videos_dir.rglob("*")):
        print(f"sample: {videos_dir} already holds videos; not generating the sample")
        return
    videos = generate(args.out, seed=args.seed, duration_scale=args.duration_scale)
    n_masks = sum(1 for p in (args.out / "truth").rglob("*.png") if not p.name.endswith(CHARACTER_MASK_SUFFIX))
    size_mb = (_tree_bytes(videos_dir) + _tree_bytes(args.out / "truth")) / 1e6
    print(f"sample: wrote {len(videos)} videos to {videos_dir} and the person and per-character truth masks of "
          f"{n_masks} frames to {args.out / 'truth'} ({size_mb:.2f} MB, seed {args.seed})")

