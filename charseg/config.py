"""Read params.yaml once, so that every stage sees the same typed, checked values.

`dvc exp run -S lr=1e-5` writes `lr: 1e-05`; plain PyYAML (YAML 1.1) reads that as the *string*
"1e-05" because its float pattern needs a dot. Our loader also accepts exponent-only floats.

SCHEMA below is the one list of every key params.yaml may hold: load_params checks each file against
it, so a misspelt key (`frames.max_sid`, a stray `epoch:`) is an error naming the closest known key
instead of a setting that silently does nothing, and a value outside what makes sense (`lr: 0`,
`jpeg_quality: 120`) is an error naming the key and the allowed range. Keys may be absent (a stage
asks for what it needs with `section` / `number`), so a partial file such as params.sample.yaml, the
profile applied on top of params.yaml, passes the same check.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from charseg.errors import CharsegError

PARAMS_FILE = Path("params.yaml")
# The square input side every SAM-family image encoder was trained at (labels.sam.image_size's default and cap).
SAM_IMAGE_SIZE = 1024

_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------------------------------------
# The schema

def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """('labels.method', 'import'), ... for every leaf of a nested params mapping (DVC's dotted keys)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def interval(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """[lo, hi] in interval notation; an open or missing bound gets a round bracket."""
    left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
    right = "inf)" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
    return f"{left}, {right}"


@dataclass(frozen=True)
class Num:
    """A number in an interval; `integer`: a whole number; `nullable`: null is allowed too; `multiple_of`:
    a whole multiple of this."""
    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False
    multiple_of: int | None = None

    def check(self, value: Any, key: str, source: str) -> None:
        if value is None and self.nullable:
            return
        kind = "a whole number" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
            raise CharsegError(f"{source}: '{key}' must be {kind}{' or null' if self.nullable else ''}, got {value!r}")
        if self.integer and float(value) != int(value):
            raise CharsegError(f"{source}: '{key}' must be a whole number, got {value!r}")
        if ((self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)) or
                (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))):
            raise CharsegError(f"{source}: '{key}' = {value} is outside "
                               f"{interval(self.lo, self.hi, self.lo_open, self.hi_open)}")
        if self.multiple_of and value % self.multiple_of:
            below = int(value // self.multiple_of * self.multiple_of)
            raise CharsegError(f"{source}: '{key}' = {value} is not a multiple of {self.multiple_of} (the nearest "
                               f"are {below} and {below + self.multiple_of})")


@dataclass(frozen=True)
class Flag:
    def check(self, value: Any, key: str, source: str) -> None:
        if not isinstance(value, bool):
            raise CharsegError(f"{source}: '{key}' must be true or false, got {value!r}")


@dataclass(frozen=True)
class Text:
    """A non-empty text (a path, a name); `choices`: one of these; `nullable`: null is allowed too."""
    choices: tuple[str, ...] = ()
    nullable: bool = False

    def check(self, value: Any, key: str, source: str) -> None:
        if value is None and self.nullable:
            return
        if self.choices:
            if value not in self.choices:
                close = difflib.get_close_matches(str(value), self.choices, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise CharsegError(f"{source}: '{key}' is {value!r}{hint}: use one of {', '.join(self.choices)}")
            return
        if not isinstance(value, str) or not value.strip():
            raise CharsegError(f"{source}: '{key}' must be a non-empty text{' or null' if self.nullable else ''}, "
                               f"got {value!r}")


class _Anything:
    def check(self, value: Any, key: str, source: str) -> None:
        pass


# Options of each architecture's constructor that a models.<name> cfg may set besides MODEL_KEYS;
# stages/lib/models.py passes them on (and tests/test_models.py checks this list against the
# constructors' signatures). charseg fixes the rest (in/out channels, activation, aux head).
ARCH_OPTIONS: dict[str, tuple[str, ...]] = {
    "unetpp": ("encoder_depth", "decoder_channels", "decoder_use_norm", "decoder_attention_type",
               "decoder_interpolation"),
    "pspnet": ("encoder_depth", "psp_out_channels", "decoder_use_norm", "psp_dropout", "upsampling"),
    "deeplabv3": ("encoder_depth", "encoder_output_stride", "decoder_channels", "decoder_atrous_rates",
                  "decoder_aspp_separable", "decoder_aspp_dropout", "upsampling"),
    "dinov2_fpn": ("pyramid_channels", "segmentation_channels", "dropout", "block_indices"),
}
MODEL_KEYS: dict[str, Any] = {
    "arch": Text(choices=tuple(ARCH_OPTIONS)),
    "encoder": Text(nullable=True),            # null: the arch's default encoder
    "encoder_weights": Text(nullable=True),    # null: from scratch
    "encoder_lr_mult": Num(lo=0),              # 0 freezes the encoder
}
TASKS = ("person", "characters")  # what the models segment: see README 'Which character is where'
# A model name becomes the DVC stage train@<name>, the param path models.<name> and models/<name>/:
# DVC refuses punctuation other than _ and - in stage names, and a '.' would split the param path.
MODEL_NAME = re.compile(r"[^\W_][\w-]*|_[\w-]+")

SCHEMA: dict[str, Any] = {
    "frames": {
        "fps": Num(lo=0.001, hi=1000),
        "max_side": Num(lo=16, integer=True, nullable=True),
        "jpeg_quality": Num(lo=1, hi=100, integer=True),
        "workers": Num(lo=0, integer=True),
        "decoder": Text(choices=("auto", "pyav", "opencv")),
    },
    "eda": {
        "samples_per_character": Num(lo=1, integer=True),
        "dark_mean": Num(lo=0, hi=255),
        "uniform_std": Num(lo=0, hi=255),
        "workers": Num(lo=0, integer=True),
    },
    "labels": {
        "method": Text(choices=("yolo_sam", "yolo_seg", "import")),
        "device": Text(),
        "half": Flag(),
        "workers": Num(lo=0, integer=True),
        "detector": {
            "weights": Text(),
            "conf": Num(lo=0, hi=1),
            "min_box_area": Num(lo=0, hi=1),
            "imgsz": Num(lo=32, integer=True),
            "batch": Num(lo=1, integer=True),
        },
        "sam": {
            "model": Text(),  # vit_b | vit_l | vit_h, or an ultralytics SAM-family file: charseg.labels.weights
            "checkpoint": Text(),
            "runtime": Text(choices=("torch", "onnx")),
            # The encoders' square input side. A multiple of 32: the SAM predictors' stride, to which ultralytics
            # would silently round any other size for the prompts but not for the image (misplaced boxes).
            # At most the 1024 every SAM was trained at: larger costs more and sees detail no training did.
            "image_size": Num(lo=256, hi=SAM_IMAGE_SIZE, integer=True, multiple_of=32),
        },
        "refine": {
            "close_kernel": Num(lo=0, integer=True),
            "open_kernel": Num(lo=0, integer=True),
            "min_area": Num(lo=0, hi=1),
            "max_hole_area": Num(lo=0, hi=1),
        },
        "import_dir": Text(),
        "import_identity": Flag(),
        "mask_index": Text(nullable=True),
        "truth_dir": Text(nullable=True),
        "cache_dir": Text(),
        "keep_empty": Flag(),
        "qa_samples": Num(lo=0, integer=True),
    },
    "identity": {
        "min_similarity": Num(lo=-1, hi=1),
        "margin": Num(lo=0, hi=2),
        "duplicate_similarity": Num(lo=-1, hi=1),
        "qa_crops": Num(lo=0, integer=True),
    },
    "task": Text(choices=TASKS),
    "split": {
        "val_fraction": Num(lo=0, hi=1, lo_open=True, hi_open=True),
        "seed": Num(lo=0, integer=True),
        "gap_seconds": Num(lo=0),
    },
    "lr": Num(lo=0, lo_open=True),
    "weight_decay": Num(lo=0),
    "epochs": Num(lo=1, integer=True),
    "batch_size": Num(lo=2, integer=True),  # BatchNorm after global pooling cannot train on one frame
    "img_size": Num(lo=32, integer=True),
    "seed": Num(lo=0, integer=True),
    "train": {
        "warmup_epochs": Num(lo=0),
        "min_lr_ratio": Num(lo=0, hi=1),
        "patience": Num(lo=0, integer=True),
        "workers": Num(lo=0, integer=True),
        "amp": Flag(),
        "augment": {
            "hflip": Num(lo=0, hi=1),
            "scale": Num(lo=0, hi=0.9),
            "shift": Num(lo=0, hi=0.5),
            "color": Num(lo=0, hi=1),
        },
    },
    "models": "models",  # name -> MODEL_KEYS + ARCH_OPTIONS[arch]: see _check_models
    "evaluate": {
        "boundary_tolerance_px": Num(lo=0),
        "latency_warmup": Num(lo=0, integer=True),
        "grid_frames": Num(lo=0, integer=True),
    },
}


def known_keys(spec: dict[str, Any] = SCHEMA, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the schema; a model's keys appear as models.<name>.<key>."""
    for key, inner in spec.items():
        name = f"{prefix}{key}"
        if isinstance(inner, dict):
            yield from known_keys(inner, f"{name}.")
        elif inner == "models":
            yield from (f"{name}.<name>.{k}" for k in [*MODEL_KEYS, *sorted({o for v in ARCH_OPTIONS.values()
                                                                              for o in v})])
        else:
            yield name


def _kind(value: Any) -> str:
    return "null" if value is None else {"list": "a list", "str": "a text", "bool": "true/false"}.get(
        type(value).__name__, f"a {type(value).__name__}")


def _unknown(key: Any, parent: str, known: list[str], source: str) -> CharsegError:
    dotted = f"{parent}.{key}" if parent else str(key)
    close = difflib.get_close_matches(str(key), known, n=1)
    if close:
        suggestion = f"{parent}.{close[0]}" if parent else close[0]
    else:  # the right key in the wrong section (`train.lr`), or a typo of a key from another section
        everything = [k for k in known_keys() if "<name>" not in k]
        same_leaf = [k for k in everything if k.rsplit(".", 1)[-1] == str(key)]
        close = same_leaf or difflib.get_close_matches(dotted, everything, n=1)
        suggestion = close[0] if close else None
    if suggestion:
        return CharsegError(f"{source}: unknown key '{dotted}' (did you mean '{suggestion}'?)")
    where = f"'{parent}'" if parent else "the top level"
    return CharsegError(f"{source}: unknown key '{dotted}': the keys of {where} are {', '.join(known)}")


def _check_mapping(value: Any, spec: dict[str, Any], key: str, source: str) -> None:
    if not isinstance(value, dict):
        raise CharsegError(f"{source}: '{key}' must be a mapping of keys ({', '.join(spec)}), got {_kind(value)}")
    for name, inner in value.items():
        if name not in spec:
            raise _unknown(name, key, list(spec), source)
        _check(inner, spec[name], f"{key}.{name}" if key else str(name), source)


def _check_models(value: Any, key: str, source: str) -> None:
    if not isinstance(value, dict):
        raise CharsegError(f"{source}: '{key}' must be a mapping of model names to their settings "
                           f"(unetpp: {{arch: unetpp, ...}}), got {_kind(value)}")
    if not value:
        raise CharsegError(f"{source}: '{key}' is empty: define at least one model, e.g. "
                           f"unetpp: {{arch: unetpp, encoder: resnet34}} (see params.yaml's comments)")
    for name, cfg in value.items():
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise CharsegError(f"{source}: model name {name!r} cannot be used: it becomes the DVC stage "
                               f"train@{name} and the param path models.{name}, so it may hold only letters, "
                               f"digits, '_' and '-' (and must not start with '-')")
        where = f"{key}.{name}"
        if not isinstance(cfg, dict):
            raise CharsegError(f"{source}: '{where}' must be a mapping (arch, encoder, ...), got {_kind(cfg)}")
        arch = cfg.get("arch")
        if "arch" in cfg:
            MODEL_KEYS["arch"].check(arch, f"{where}.arch", source)
        # Without an arch (a profile that only overrides some keys) any architecture's option is known.
        options = ARCH_OPTIONS[arch] if arch in ARCH_OPTIONS else sorted({o for v in ARCH_OPTIONS.values() for o in v})
        for option in cfg:
            if option in MODEL_KEYS:
                MODEL_KEYS[option].check(cfg[option], f"{where}.{option}", source)
            elif option not in options:
                raise _unknown_option(str(option), where, arch, options, source)


def _unknown_option(option: str, where: str, arch: str, options: Any, source: str) -> CharsegError:
    """An option this arch does not take: another arch's option (or a typo of one) says so."""
    own = [*MODEL_KEYS, *options]
    others = sorted({o for opts in ARCH_OPTIONS.values() for o in opts} - set(own))
    best = max(own + others, key=lambda k: difflib.SequenceMatcher(None, option, k).ratio())
    if best in others and difflib.SequenceMatcher(None, option, best).ratio() >= 0.6:
        archs = ", ".join(a for a, opts in ARCH_OPTIONS.items() if best in opts)
        what = f"'{where}.{option}' is" if best == option else f"unknown key '{where}.{option}': '{best}' is"
        return CharsegError(f"{source}: {what} an option of arch {archs}, not of '{arch}', which accepts "
                            f"{', '.join(options)}")
    return _unknown(option, where, own, source)


def _check(value: Any, spec: Any, key: str, source: str) -> None:
    if isinstance(spec, dict):
        _check_mapping(value, spec, key, source)
    elif spec == "models":
        _check_models(value, key, source)
    else:
        spec.check(value, key, source)


def check_params(params: Any, source: str = "params.yaml") -> None:
    """Raise a CharsegError naming the first unknown key or out-of-range value of a params mapping."""
    if not isinstance(params, dict):
        raise CharsegError(f"{source} must hold a mapping of sections, got {_kind(params)}")
    _check_mapping(params, SCHEMA, "", source)


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path} not found: run stages from the repository root (where params.yaml is)")
    try:
        params = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CharsegError(f"{path} is not valid YAML: {err}") from err
    check_params(params, str(path))
    return params


# ---------------------------------------------------------------------------------------------
# Typed sections: what the stages receive. Built from a checked mapping, so the values are already in range;
# a key that is absent is reported when the section is first asked for (a partial params file passes the
# schema, and a stage needs only its own sections).

@dataclass(frozen=True)
class FramesConfig:
    fps: float
    max_side: int | None
    jpeg_quality: int
    workers: int
    # auto (PyAV, OpenCV for what PyAV cannot open) | pyav | opencv. A params.yaml written before the key
    # existed keeps the decoder it was made with.
    decoder: str = "opencv"


@dataclass(frozen=True)
class EdaConfig:
    samples_per_character: int
    dark_mean: float
    uniform_std: float
    workers: int


@dataclass(frozen=True)
class DetectorConfig:
    weights: Path
    conf: float
    min_box_area: float
    imgsz: int
    batch: int


@dataclass(frozen=True)
class SamConfig:
    model: str                  # vit_b | vit_l | vit_h (segment-anything), or an ultralytics SAM-family weights file
    checkpoint: Path            # the vit_* checkpoint (ultralytics files are named by `model` itself)
    runtime: str = "torch"      # torch | onnx: where the image encoder runs (onnx: not SAM 2)
    image_size: int = SAM_IMAGE_SIZE  # the encoder's square input side: smaller is faster and coarser (not vit_*)


@dataclass(frozen=True)
class RefineConfig:
    close_kernel: int = 0       # pixels; 0 or 1 = no closing
    open_kernel: int = 0        # pixels; 0 or 1 = no opening
    min_area: float = 0.0       # fraction of the frame area; smaller blobs are dropped
    max_hole_area: float = 0.0  # fraction of the frame area; smaller holes are filled (1 = every hole)


@dataclass(frozen=True)
class TruthConfig:
    """Exact masks to score against (labels.truth_dir, found through labels.mask_index): the masks stage's label
    QA, the identity stage's accuracy and evaluate's second scoring."""
    folder: Path
    mask_index: str | None = None


@dataclass(frozen=True)
class LabelsConfig:
    method: str
    device: str
    half: bool
    workers: int                # labelling processes over disjoint shards of the frames (0: one per GPU)
    detector: DetectorConfig
    sam: SamConfig
    refine: RefineConfig
    import_dir: Path
    mask_index: str | None      # the index CSV's name in import_dir / truth_dir; None: masks are <frame id>.png
    truth_dir: Path | None      # exact masks (the sample's data/raw/truth): QA of the labels, and evaluate
    cache_dir: Path
    keep_empty: bool
    qa_samples: int
    import_identity: bool = False  # method import: take per-character masks (the index's character_mask column)


@dataclass(frozen=True)
class IdentityConfig:
    """Weak identity (the identity stage): each person instance to a character of the folder names, or other."""
    min_similarity: float        # below this cosine similarity to every prototype, an instance is `other`
    margin: float                # ... and when the best prototype beats the runner-up by less than this
    duplicate_similarity: float  # two characters' prototypes this similar: warned as maybe the same person
    qa_crops: int                # crops per character in plots/identity/contact_<character>.png


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float
    seed: int
    gap_seconds: float


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float
    scale: float
    shift: float
    color: float


@dataclass(frozen=True)
class TrainConfig:
    """The shared training params: the top-level keys and the `train:` section."""
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    img_size: int
    seed: int
    warmup_epochs: float
    min_lr_ratio: float
    patience: int
    workers: int
    amp: bool
    augment: AugmentConfig


TRAIN_TOP_LEVEL = ("lr", "weight_decay", "epochs", "batch_size", "img_size", "seed")


@dataclass(frozen=True)
class EvaluateConfig:
    boundary_tolerance_px: float
    latency_warmup: int
    grid_frames: int


@dataclass(frozen=True)
class ModelConfig:
    """One `models.<name>` entry. `params` is the mapping as written (what checkpoints store and
    models.build_model takes); the typed fields are read from it."""
    name: str
    arch: str
    encoder: str | None
    encoder_weights: str | None
    encoder_lr_mult: float
    params: dict[str, Any]


def _convert(kind: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key, source)
    if value is None:
        return None  # the schema allowed it
    options = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
    base = options[0]
    if base in (int, float):
        return base(value)
    if base is Path:
        return Path(value)
    return value


def _build(cls: type, raw: Any, where: str, source: str, top_level: Sequence[str] = ()) -> Any:
    """cls from the mapping `raw` (the section `where`); keys in `top_level` are named without the prefix."""
    if not isinstance(raw, dict):
        raise CharsegError(f"{source} has no '{where}:' section (see README.md, 'Parameters')")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        key = field.name if field.name in top_level else f"{where}.{field.name}"
        if field.name not in raw:
            if field.default is not dataclasses.MISSING:
                continue
            raise CharsegError(f"{source}: '{key}' is missing")
        values[field.name] = _convert(hints[field.name], raw[field.name], key, source)
    return cls(**values)


class Params:
    """params.yaml, read and checked once; each stage takes its typed section (`params.frames`, ...)."""

    def __init__(self, raw: dict[str, Any], source: str = "params.yaml") -> None:
        check_params(raw, source)
        self.raw, self.source = raw, source

    def _section(self, cls: type, name: str) -> Any:
        return _build(cls, self.raw.get(name), name, self.source)

    @functools.cached_property
    def frames(self) -> FramesConfig:
        return self._section(FramesConfig, "frames")

    @functools.cached_property
    def eda(self) -> EdaConfig:
        return self._section(EdaConfig, "eda")

    @functools.cached_property
    def labels(self) -> LabelsConfig:
        return self._section(LabelsConfig, "labels")

    @functools.cached_property
    def identity(self) -> IdentityConfig:
        return self._section(IdentityConfig, "identity")

    @property
    def truth(self) -> TruthConfig | None:
        """labels.truth_dir and labels.mask_index (None without a truth_dir): two keys of the labels section, all
        that the stages scoring against the truth read and declare, so other labels params do not rerun them."""
        folder = self.value("labels.truth_dir")
        return TruthConfig(Path(folder), self.value("labels.mask_index")) if folder else None

    @property
    def task(self) -> str:
        """person (one binary person mask) or characters (background, each character, other)."""
        return str(self.value("task"))

    @functools.cached_property
    def split(self) -> SplitConfig:
        return self._section(SplitConfig, "split")

    @functools.cached_property
    def evaluate(self) -> EvaluateConfig:
        return self._section(EvaluateConfig, "evaluate")

    @functools.cached_property
    def train(self) -> TrainConfig:
        section = self.raw.get("train")
        if not isinstance(section, dict):
            raise CharsegError(f"{self.source} has no 'train:' section (see README.md, 'Parameters')")
        merged = {**{k: self.raw[k] for k in TRAIN_TOP_LEVEL if k in self.raw}, **section}
        return _build(TrainConfig, merged, "train", self.source, top_level=TRAIN_TOP_LEVEL)

    @property
    def model_names(self) -> list[str]:
        models = self.raw.get("models")
        if not isinstance(models, dict):
            raise CharsegError(f"{self.source} has no 'models:' section (see README.md, 'Parameters')")
        return list(models)

    def model_config(self, name: str) -> ModelConfig:
        """models.<name>; an unknown name lists the defined ones (and the closest, if one is close)."""
        known = self.model_names
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CharsegError(f"unknown model '{name}'{hint}: {Path(self.source).name} 'models:' defines "
                               f"{', '.join(known)}")
        cfg = self.raw["models"][name]
        if "arch" not in cfg:
            raise CharsegError(f"{self.source}: 'models.{name}.arch' is missing")
        return ModelConfig(name=name, arch=cfg["arch"], encoder=cfg.get("encoder"),
                           encoder_weights=cfg.get("encoder_weights"),
                           encoder_lr_mult=float(cfg.get("encoder_lr_mult", 1.0)), params=dict(cfg))

    def value(self, key: str) -> Any:
        """One checked value by its dotted key (`labels.keep_empty`): for a stage that needs a single key of
        another stage's section, which a partial params file need not hold whole."""
        node: Any = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CharsegError(f"{self.source}: '{key}' is missing")
            node = node[part]
        return node

    def models(self) -> dict[str, ModelConfig]:
        return {name: self.model_config(name) for name in self.model_names}


def load_config(path: str | Path = PARAMS_FILE) -> Params:
    """params.yaml read once and checked against SCHEMA; sections are typed on first use."""
    return Params(load_params(path), str(path))
