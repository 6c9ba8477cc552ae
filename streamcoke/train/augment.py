"""Batched image augmentation on the batch's own device (the GPU in training), so that the
data loader only decodes.

Every random parameter of a view is drawn for the whole batch in one call, and crop, flip,
rotation and translation make one affine matrix per sample, applied with one
``affine_grid`` + ``grid_sample``. Colour operations take per-sample factors; a sample that
does not draw an operation gets its identity factor (or is selected out with ``where``), so
nothing loops over samples and nothing waits on the device.

The recipes follow the usual self-supervised ones (SimCLR, BYOL, SwAV, CoKe), with three
simplifications: crops are continuous (no rounding to whole pixels), the four jitter
operations run in a fixed order (brightness, contrast, saturation, hue) instead of a random
one, and the hue shift is a rotation of the chroma plane in YIQ space rather than an exact
shift in HSV.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_TRIES = 10  # candidate crops per sample, as in torchvision's RandomResizedCrop
# Columns of the one uniform draw per view: fixed, so enabling an operation does not change
# the crops (or any other operation's parameters) drawn from the same generator state.
_AREA, _RATIO = slice(0, CROP_TRIES), slice(CROP_TRIES, 2 * CROP_TRIES)
(_X, _Y, _FLIP, _ANGLE, _TX, _TY, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, _BLUR, _SIGMA,
 _SOLAR) = range(2 * CROP_TRIES, 2 * CROP_TRIES + 15)
_N_UNIFORM = _SOLAR + 1

_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)  # once, on the host: an inverse on the GPU would sync


@dataclass(frozen=True)
class ViewSpec:
    """How to make one view of an image.

    Parameters
    ----------
    size : int
        Side of the square output, in pixels.
    scale : (float, float), default=(0.08, 1.0)
        Range of the crop's area, as a fraction of the image's area.
    ratio : (float, float), default=(3/4, 4/3)
        Range of the crop's aspect ratio (width / height), drawn log-uniformly.
    hflip : float, default=0.5
        Probability of a horizontal flip.
    color_jitter : float, default=0.8
        Probability of colour jitter, with strengths ``brightness``, ``contrast``,
        ``saturation`` (factors drawn from ``[max(0, 1 - s), 1 + s]``) and ``hue`` (a shift
        drawn from ``[-hue, hue]`` of a full turn).
    grayscale : float, default=0.2
        Probability of converting to grey (kept as three equal channels).
    blur : float, default=0.0
        Probability of a gaussian blur with sigma drawn from ``blur_sigma``; the kernel is
        about 10% of ``size`` (odd).
    solarize : float, default=0.0
        Probability of inverting every pixel value at or above one half.
    max_rotation : float, default=0.0
        Rotation drawn from ``[-max_rotation, max_rotation]`` degrees.
    max_translate : float, default=0.0
        Shift drawn from ``[-max_translate, max_translate]`` of ``size``, on each axis.
    padding : {"border", "zeros"}, default="border"
        What a view shows outside the image: its edge pixels repeated (photos), or black
        (images drawn on a black background, such as the digits).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    max_rotation: float = 0.0
    max_translate: float = 0.0
    padding: str = "border"

    def __post_init__(self):
        try:
            size = operator.index(self.size)  # ints, numpy ints; not floats
        except TypeError:
            size = 0
        if isinstance(self.size, bool) or size < 1:
            raise ValueError(f"ViewSpec.size must be a positive int, got {self.size!r}")
        object.__setattr__(self, "size", size)
        for name in ("scale", "ratio", "blur_sigma"):
            value = getattr(self, name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"ViewSpec.{name} must be a pair (low, high), got {value!r}") from None
            if not 0 < lo <= hi:
                raise ValueError(f"ViewSpec.{name} must satisfy 0 < low <= high, got {value!r}")
            object.__setattr__(self, name, (lo, hi))  # lists become tuples: the spec stays hashable
        if self.scale[1] > 1:
            raise ValueError(f"ViewSpec.scale is a fraction of the image's area: at most 1, got {self.scale!r}")
        for name in ("hflip", "color_jitter", "grayscale", "blur", "solarize"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"ViewSpec.{name} is a probability: in [0, 1], got {p!r}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ViewSpec.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ViewSpec.hue is a fraction of a turn: in [0, 0.5], got {self.hue!r}")
        if not 0 <= self.max_rotation <= 180:
            raise ValueError(f"ViewSpec.max_rotation is in degrees: in [0, 180], got {self.max_rotation!r}")
        if not 0 <= self.max_translate <= 1:
            raise ValueError(f"ViewSpec.max_translate is a fraction of size: in [0, 1], got {self.max_translate!r}")
        if self.padding not in ("border", "zeros"):
            raise ValueError(f"ViewSpec.padding must be 'border' or 'zeros', got {self.padding!r}")

    @property
    def blur_kernel(self) -> int:
        """Side of the blur kernel: about 10% of ``size``, odd, at least 3."""
        return max(3, int(0.1 * self.size) | 1)


def imagenet_views(kind: str = "single") -> list[ViewSpec]:
    """View recipes for ImageNet-sized images.

    ``"single"``: one 224 px view (CoKe's single-view recipe: crops of 8-100% of the area,
    jitter with probability 0.8, grey 0.2, blur 0.5). ``"two"``: two such views, the second
    blurred less often (0.1) and solarized with probability 0.2, the asymmetry of BYOL.
    ``"multicrop"``: two 224 px views of 14-100% of the area and six 96 px views of 5-14% (SwAV).
    """
    if kind == "single":
        return [ViewSpec(224, blur=0.5)]
    if kind == "two":
        return [ViewSpec(224, blur=0.5), ViewSpec(224, blur=0.1, solarize=0.2)]
    if kind == "multicrop":
        return [ViewSpec(224, scale=(0.14, 1.0), blur=0.5)] * 2 + [ViewSpec(96, scale=(0.05, 0.14), blur=0.5)] * 6
    raise ValueError(f"unknown view recipe {kind!r}: expected 'single', 'two' or 'multicrop'")


def small_image_views(size: int, n_views: int = 1) -> list[ViewSpec]:
    """Views of tiny grey images such as 8x8 digits: mild crops, rotations and shifts, no flip
    (digits are not mirror-symmetric), no colour operations, black outside the image."""
    spec = ViewSpec(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.0, color_jitter=0.0, grayscale=0.0,
                    max_rotation=12.0, max_translate=0.1, padding="zeros")
    return [spec] * int(n_views)


# ---------------------------------------------------------------------------- functional core
def crop_boxes(u_area: Tensor, u_ratio: Tensor, u_x: Tensor, u_y: Tensor, height: int, width: int,
               scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random resized crops from uniform draws: centre x, centre y, width, height in pixels.

    ``u_area`` and ``u_ratio`` (B, T) give T candidate crops per sample; the first that fits
    in the image is taken, else the central crop of the largest allowed aspect ratio (the
    rejection sampling of torchvision's RandomResizedCrop, without a loop). ``u_x``, ``u_y``
    (B,) place the crop.
    """
    area = float(height * width)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w, h = torch.sqrt(target * aspect), torch.sqrt(target / aspect)
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], height
    else:
        fw, fh = width, height
    ok = fits.any(1)
    w, h = torch.where(ok, w, torch.full_like(w, fw)), torch.where(ok, h, torch.full_like(h, fh))
    cx = torch.where(ok, (width - w) * u_x + w / 2, torch.full_like(w, width / 2))
    cy = torch.where(ok, (height - h) * u_y + h / 2, torch.full_like(h, height / 2))
    return cx, cy, w, h


def affine_theta(cx: Tensor, cy: Tensor, w: Tensor, h: Tensor, height: int, width: int, flip: Tensor,
                 angle: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """(B, 2, 3) matrices for ``F.affine_grid(..., align_corners=False)``: crop the box (pixels),
    flip, rotate by ``angle`` (radians, counter-clockwise on screen) and shift by ``tx``, ``ty``
    (fractions of the output's side).

    The output pixel o (normalised to [-1, 1]) samples the input at S F R(-angle) (o - 2 t) + c,
    with c the box centre and S its half-extent, in the input's normalised coordinates. The
    rotation acts in the output's square frame, so it is rigid whatever the crop's shape.
    """
    sx, sy = w / width, h / height
    f = torch.where(flip, -1.0, 1.0).to(w.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a, b = sx * f * cos, -sx * f * sin  # sampling at R(angle) o in y-down coordinates turns the
    c, d = sy * sin, sy * cos             # picture counter-clockwise on screen
    tx, ty = 2 * tx, 2 * ty
    ex = 2 * cx / width - 1 - (a * tx + b * ty)
    ey = 2 * cy / height - 1 - (c * tx + d * ty)
    return torch.stack([torch.stack([a, b, ex], 1), torch.stack([c, d, ey], 1)], 1)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def luma(x: Tensor) -> Tensor:
    """(B, 1, H, W) brightness of RGB (or grey) images."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def hue_matrices(shift: Tensor) -> Tensor:
    """(B, 3, 3) RGB matrices that turn the chroma plane (I, Q of YIQ) by ``shift`` turns.

    A cheap stand-in for a shift of the HSV hue: one matrix product, no colour-space
    round trip, and a shift of 0 gives the identity exactly.
    """
    to_yiq = _RGB_TO_YIQ.to(shift.device, shift.dtype)
    to_rgb = _YIQ_TO_RGB.to(shift.device, shift.dtype)
    turn = 2 * math.pi * shift
    cos, sin = torch.cos(turn), torch.sin(turn)
    rot = torch.zeros(len(shift), 3, 3, dtype=shift.dtype, device=shift.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = to_rgb @ rot @ to_yiq
    eye = torch.eye(3, dtype=shift.dtype, device=shift.device)
    return torch.where((shift == 0).view(-1, 1, 1), eye, m)


def color_jitter(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor | None,
                 hue: Tensor | None) -> Tensor:
    """Per-sample brightness, contrast, saturation factors and hue shift (turns), each clamped
    to [0, 1]; factors of 1 and a shift of 0 leave a sample unchanged. Saturation and hue
    need RGB (pass None for grey images)."""
    x = (x * _per_sample(brightness)).clamp_(0, 1)
    c = _per_sample(contrast)
    x = (c * x + (1 - c) * luma(x).mean((1, 2, 3), keepdim=True)).clamp_(0, 1)
    if saturation is not None:
        s = _per_sample(saturation)
        x = (s * x + (1 - s) * luma(x)).clamp_(0, 1)
    if hue is not None:
        x = torch.einsum("bij,bjhw->bihw", hue_matrices(hue), x).clamp_(0, 1)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample gaussian blur (separable, reflected edges); ``sigma <= 0`` leaves a sample as is."""
    n, ch, height, width = x.shape
    r = min(kernel_size // 2, height - 1, width - 1)  # reflection needs a pad smaller than the image
    if r < 1:
        return x
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp_min(1e-6).unsqueeze(1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = torch.where((sigma > 0).unsqueeze(1), k, (t == 0).to(x.dtype))
    k = k.repeat_interleave(ch, 0)  # one kernel per (sample, channel): a grouped convolution
    y = F.pad(x.reshape(1, n * ch, height, width), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(n * ch, 1, -1, 1), groups=n * ch)
    y = F.conv2d(y, k.view(n * ch, 1, 1, -1), groups=n * ch)
    return y.view(n, ch, height, width)


def solarize(x: Tensor, apply: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixel values at or above ``threshold`` in the samples where ``apply`` is True."""
    return torch.where(_per_sample(apply) & (x >= threshold), 1 - x, x)


def augment_view(x: Tensor, spec: ViewSpec, u: Tensor) -> Tensor:
    """One view of float images ``x`` (B, C, H, W) in [0, 1], from uniform draws ``u``
    (B, ``_N_UNIFORM``); not yet normalised."""
    n, ch, height, width = x.shape
    cx, cy, w, h = crop_boxes(u[:, _AREA], u[:, _RATIO], u[:, _X], u[:, _Y], height, width, spec.scale, spec.ratio)
    flip = u[:, _FLIP] < spec.hflip
    angle = (2 * u[:, _ANGLE] - 1) * math.radians(spec.max_rotation)
    tx, ty = (2 * u[:, _TX] - 1) * spec.max_translate, (2 * u[:, _TY] - 1) * spec.max_translate
    theta = affine_theta(cx, cy, w, h, height, width, flip, angle, tx, ty)
    grid = F.affine_grid(theta, [n, ch, spec.size, spec.size], align_corners=False)
    # "border": a rotated or shifted photo's corners repeat its edge instead of turning black
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode=spec.padding, align_corners=False)

    rgb = ch == 3
    if spec.color_jitter > 0:
        on = u[:, _JITTER] < spec.color_jitter

        def factor(col, strength):
            lo, hi = max(0.0, 1 - strength), 1 + strength
            return torch.where(on, lo + (hi - lo) * u[:, col], 1.0)

        hue = torch.where(on, (2 * u[:, _HUE] - 1) * spec.hue, 0.0) if rgb and spec.hue > 0 else None
        y = color_jitter(y, factor(_BRIGHT, spec.brightness), factor(_CONTRAST, spec.contrast),
                         factor(_SAT, spec.saturation) if rgb else None, hue)
    if rgb and spec.grayscale > 0:
        y = torch.where(_per_sample(u[:, _GRAY] < spec.grayscale), luma(y).expand_as(y), y)
    if spec.blur > 0:
        lo, hi = spec.blur_sigma
        sigma = torch.where(u[:, _BLUR] < spec.blur, lo + (hi - lo) * u[:, _SIGMA], 0.0)
        y = gaussian_blur(y, sigma, spec.blur_kernel)
    if spec.solarize > 0:
        y = solarize(y, u[:, _SOLAR] < spec.solarize)
    return y


# ------------------------------------------------------------------------------------ module
class Augment(torch.nn.Module):
    """Make views of a batch of images, on the batch's device.

    Parameters
    ----------
    views : sequence of ViewSpec
        One output per view, in order.
    mean, std : sequence of float
        Per-channel normalisation, one value per channel of the images.

    ``forward(images, generator=None)`` takes uint8 images (B, C, H, W) (or floats in
    [0, 1]) and returns one float32 tensor (B, C, size, size) per view, normalised and in
    ``torch.channels_last`` memory format. Random numbers come from ``generator`` (which must
    live on the images' device) or the device's default generator; the same generator state
    gives the same views.

    Examples
    --------
    >>> aug = Augment(small_image_views(8, n_views=2), mean=[0.5], std=[0.25])
    >>> views = aug(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.Generator().manual_seed(0))
    >>> [tuple(v.shape) for v in views], views[0].is_contiguous(memory_format=torch.channels_last)
    ([(4, 1, 8, 8), (4, 1, 8, 8)], True)
    """

    def __init__(self, views: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.views = list(views)
        if not self.views or not all(isinstance(v, ViewSpec) for v in self.views):
            raise ValueError("views must be a non-empty sequence of ViewSpec")
        if len(mean) != len(std) or not len(mean):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"views={[v.size for v in self.views]}, channels={self.mean.shape[1]}"

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        ch = images.shape[1]
        if ch != self.mean.shape[1]:
            raise ValueError(f"images have {ch} channels but mean and std have {self.mean.shape[1]} values")
        device = images.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the images are on {device}: "
                             "draw random numbers where the images are")
        if images.dtype == torch.uint8:
            x = images.float().div_(255)
        elif images.is_floating_point():
            x = images.float()
        else:
            raise ValueError(f"expected uint8 images or floats in [0, 1], got {images.dtype}")
        mean, std = self.mean.to(device), self.std.to(device)
        out = []
        for spec in self.views:
            u = torch.rand(len(x), _N_UNIFORM, device=device, generator=generator)
            y = (augment_view(x, spec, u) - mean) / std
            out.append(y.contiguous(memory_format=torch.channels_last))
        return out
