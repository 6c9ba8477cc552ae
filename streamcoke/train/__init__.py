"""Encoder pretraining on online constrained k-means pseudo-labels (the CoKe recipe)."""

from .augment import Augment, ViewSpec, imagenet_views, small_image_views
from .evaluate import embed, evaluate_features, knn_top1, linear_probe
from .images import ImageBatch, ImageShardSource, TensorImageSource, load_digits_images
from .memory import LabelMemory
from .models import CoKeNetwork, SmallConvNet, build_encoder
from .recipe import Recipe, builtin_recipes, load_recipe
from .trainer import CoKeTrainer

__all__ = [
    "Augment", "CoKeNetwork", "CoKeTrainer", "ImageBatch", "ImageShardSource", "LabelMemory", "Recipe",
    "SmallConvNet", "TensorImageSource", "ViewSpec", "build_encoder", "builtin_recipes", "embed",
    "evaluate_features", "imagenet_views", "knn_top1", "linear_probe", "load_digits_images", "load_recipe",
    "small_image_views",
]
