"""Training recipes: every setting of a pretraining run, readable from a TOML file.

The recipes that ship with the library live in ``streamcoke/train/recipes/``: ``digits`` (the
default CPU run on scikit-learn's digits) and the published ImageNet settings of CoKe
(``imagenet-single``, ``imagenet-two``, ``imagenet-multicrop``). Any field can be overridden
from the command line or in Python with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

VIEW_KINDS = ("single", "two", "multicrop", "small")


@dataclass(frozen=True)
class Recipe:
    """Settings of a CoKe pretraining run (defaults: CoKe's single-view ImageNet recipe)."""

    # network
    encoder: str = "resnet50"
    encoder_width: int = 32  # width of the built-in "small" encoder's first stage
    projection_dims: tuple[int, ...] = (2048, 2048, 128)
    predictor_dims: tuple[int, ...] | None = (2048, 128)
    predictor_weight: float = 1.0  # loss weight of the predictor branch; the rest goes to the projection
    # (empty projection_dims: cluster the encoder's output; empty predictor_dims: no predictor)
    # clustering
    n_clusters: tuple[int, ...] = (3000, 4000, 5000)
    min_size_ratio: float = 0.4
    temperature: float = 0.1
    # data and views
    label_view: str = "first"  # what the clusterer assigns: the first augmented view, or the "clean" image
    views: str = "single"  # single | two | multicrop (ImageNet) | small (tiny grey images)
    small_views: int = 1  # number of views of kind "small"
    image_size: int = 224
    load_size: int = 256
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # optimisation
    epochs: int = 1001
    batch_size: int = 1024  # global, over all ranks
    optimizer: str = "lars"
    lr: float = 1.6
    final_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    warmup_epochs: int = 11
    # stage two: soft labels from the recent epochs' assignments, centers averaged over them
    stage2_epoch: int | None = 801
    stage2_history: int = 5
    stage2_temperature: float = 0.5
    # systems
    precision: str = "bf16"  # bf16 autocast on CUDA; fp32 everywhere else
    channels_last: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("projection_dims", "predictor_dims", "n_clusters", "mean", "std"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        problems = []
        if self.views not in VIEW_KINDS:
            problems.append(f"views must be one of {', '.join(VIEW_KINDS)}, got {self.views!r}")
        if not self.n_clusters or min(self.n_clusters) < 2:
            problems.append(f"n_clusters must be a non-empty list of integers >= 2, got {self.n_clusters}")
        if not 0 <= self.min_size_ratio <= 1:
            problems.append(f"min_size_ratio must be in [0, 1], got {self.min_size_ratio}")
        if self.temperature <= 0 or self.stage2_temperature <= 0:
            problems.append("temperatures must be positive")
        if not 0 <= self.predictor_weight <= 1:
            problems.append(f"predictor_weight must be in [0, 1], got {self.predictor_weight}")
        if not self.predictor_dims:
            object.__setattr__(self, "predictor_dims", None)
        if self.small_views < 1:
            problems.append(f"small_views must be >= 1, got {self.small_views}")
        if self.label_view not in ("first", "clean"):
            problems.append(f"label_view must be 'first' or 'clean', got {self.label_view!r}")
        if self.predictor_dims is None and self.predictor_weight > 0:
            object.__setattr__(self, "predictor_weight", 0.0)
        if self.predictor_weight == 0 and self.predictor_dims is not None:
            # A predictor whose loss weighs nothing gets no gradient, which DistributedDataParallel
            # rejects at its second step; it would only cost compute, so there is none.
            object.__setattr__(self, "predictor_dims", None)
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_epochs < 0:
            problems.append("epochs and batch_size must be >= 1 and warmup_epochs >= 0")
        if self.stage2_epoch is not None and (self.stage2_epoch < 1 or self.stage2_history < 1):
            problems.append("stage2_epoch and stage2_history must be >= 1 (or stage2_epoch unset)")
        if self.precision not in ("bf16", "fp32"):
            problems.append(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if len(self.mean) != len(self.std):
            problems.append("mean and std need one value per channel")
        if problems:
            raise ValueError("invalid recipe: " + "; ".join(problems))

    @property
    def in_channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else ([] if v is None and k == "predictor_dims" else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, source: str = "recipe") -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the library."""
    return sorted(p.name[:-5] for p in resources.files("streamcoke.train.recipes").iterdir()
                  if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name (``"digits"``, ``"imagenet-single"``, ...) or a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"no recipe file {str(path)!r}") from None
        source = str(path)
    else:
        res = resources.files("streamcoke.train.recipes") / f"{name_or_path}.toml"
        if not res.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}; built in: {', '.join(builtin_recipes())}, "
                             "or give a path to a .toml file")
        text, source = res.read_text(), f"recipe {name_or_path!r}"
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source} is not valid TOML: {exc}") from None
    values.pop("description", None)
    if "stage2_epoch" in values and values["stage2_epoch"] in (0, False):
        values["stage2_epoch"] = None
    return Recipe.from_dict(values, source)
