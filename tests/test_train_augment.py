"""Batched augmentation: shapes and layout, determinism, exact geometry, colour operations."""

import math

import pytest
import torch
import torch.nn.functional as F

from streamcoke.train.augment import (IMAGENET_MEAN, IMAGENET_STD, Augment, ViewSpec, affine_theta, color_jitter,
                                      crop_boxes, gaussian_blur, imagenet_views, small_image_views)

PLAIN = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0, grayscale=0.0)


def images(n=4, c=3, h=16, w=16, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def denorm(y, mean, std):
    return y * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def test_shapes_dtype_layout_and_normalisation():
    x = images(5, h=20, w=24)
    views = [ViewSpec(12, blur=0.5, solarize=0.3), ViewSpec(8, scale=(0.05, 0.2))]
    out = Augment(views, IMAGENET_MEAN, IMAGENET_STD)(x, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in out] == [(5, 3, 12, 12), (5, 3, 8, 8)]
    for v in out:
        assert v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last)
        raw = denorm(v, IMAGENET_MEAN, IMAGENET_STD)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_same_generator_state_same_views():
    x = images(6)
    aug = Augment([ViewSpec(12, blur=0.5, solarize=0.5, max_rotation=30, max_translate=0.2)] * 2,
                  IMAGENET_MEAN, IMAGENET_STD)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and not torch.equal(u, w)
    assert not torch.equal(a[0], a[1])  # views of one call draw their own parameters


def test_plain_view_is_the_image_resized():
    x = images(3, h=8, w=8)
    for size in (8, 16, 5):
        (y,) = Augment([ViewSpec(size, **PLAIN)], [0.5] * 3, [0.25] * 3)(x, torch.Generator().manual_seed(0))
        want = F.interpolate(x.float() / 255, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(denorm(y, [0.5] * 3, [0.25] * 3), want, atol=1e-5, rtol=0)


def test_hflip_is_a_mirror_image_and_float_input_matches_uint8():
    x = images(3, h=10, w=10)
    aug = Augment([ViewSpec(10, **{**PLAIN, "hflip": 1.0})], [0.0] * 3, [1.0] * 3)
    (y,) = aug(x)
    torch.testing.assert_close(y, x.flip(-1).float() / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(aug(x.float() / 255)[0], y)


def test_too_wide_image_falls_back_to_the_central_crop():
    x = images(2, h=8, w=12)  # a square crop of the whole area does not fit: centre 8x8 instead
    (y,) = Augment([ViewSpec(8, **PLAIN)], [0.0] * 3, [1.0] * 3)(x)
    torch.testing.assert_close(y, x[..., 2:10].float() / 255, atol=1e-5, rtol=0)


def test_crop_boxes_stay_inside_and_cover_the_asked_area():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2000, 22, generator=g)
    cx, cy, w, h = crop_boxes(u[:, :10], u[:, 10:20], u[:, 20], u[:, 21], 30, 40, (0.1, 0.5), (0.5, 2.0))
    assert ((cx - w / 2) >= -1e-4).all() and ((cx + w / 2) <= 40 + 1e-4).all()
    assert ((cy - h / 2) >= -1e-4).all() and ((cy + h / 2) <= 30 + 1e-4).all()
    area = w * h / 1200
    assert area.min() >= 0.1 - 1e-5 and area.max() <= 0.5 + 1e-5
    assert ((w / h) >= 0.5 - 1e-4).all() and ((w / h) <= 2 + 1e-4).all()


def test_rotation_is_counter_clockwise_and_translation_shifts():
    x = images(1, c=1, h=8, w=8).float()
    one, no = torch.ones(1), torch.zeros(1, dtype=torch.bool)

    def warp(angle=0.0, tx=0.0, ty=0.0):
        theta = affine_theta(one * 4, one * 4, one * 8, one * 8, 8, 8, no, one * angle, one * tx, one * ty)
        grid = F.affine_grid(theta, [1, 1, 8, 8], align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")

    torch.testing.assert_close(warp(math.pi / 2), torch.rot90(x, 1, (2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(warp(tx=0.25)[..., 2:], x[..., :6], atol=1e-3, rtol=0)  # right by 2 of 8 pixels
    torch.testing.assert_close(warp(ty=-0.25)[..., :6, :], x[..., 2:, :], atol=1e-3, rtol=0)  # up by 2


def test_grey_images_and_small_views():
    x = images(7, c=1, h=8, w=8)
    views = small_image_views(8, n_views=2)
    assert all(v.hflip == 0 and v.color_jitter == 0 and v.max_rotation == 12 for v in views)
    out = Augment(views, [0.3], [0.3])(x, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in out] == [(7, 1, 8, 8)] * 2 and not torch.equal(out[0], out[1])
    # colour operations on one channel: brightness and contrast only
    (y,) = Augment([ViewSpec(8, color_jitter=1.0, grayscale=1.0, blur=1.0, solarize=1.0)], [0.0], [1.0])(x)
    assert y.shape == (7, 1, 8, 8) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="1 channels but mean and std have 3"):
        Augment(views, IMAGENET_MEAN, IMAGENET_STD)(x)


def test_colour_operations():
    x = images(4, h=12, w=12)
    base = Augment([ViewSpec(12, **PLAIN)], [0.0] * 3, [1.0] * 3)(x)[0]
    (grey,) = Augment([ViewSpec(12, **{**PLAIN, "grayscale": 1.0})], [0.0] * 3, [1.0] * 3)(x)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    (sol,) = Augment([ViewSpec(12, **{**PLAIN, "solarize": 1.0})], [0.0] * 3, [1.0] * 3)(x)
    torch.testing.assert_close(sol, torch.where(base >= 0.5, 1 - base, base))
    ones = torch.ones(4)
    torch.testing.assert_close(color_jitter(base, ones, ones, ones, torch.zeros(4)), base)  # identity factors
    # saturation 0 is grey; a hue shift keeps brightness (luma) nearly unchanged on mid-range colours
    flat = color_jitter(base, ones, ones, torch.zeros(4), None)
    assert torch.allclose(flat[:, 0], flat[:, 1], atol=1e-6)
    mid = base * 0.5 + 0.25
    shifted = color_jitter(mid, ones, ones, ones, torch.full((4,), 0.25))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((shifted * luma).sum(1), (mid * luma).sum(1), atol=0.05, rtol=0)
    assert not torch.allclose(shifted, mid, atol=0.05)


def test_gaussian_blur_is_per_sample():
    x = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    x[2] = 0.7
    y = gaussian_blur(x, torch.tensor([0.0, 1.5, 2.0]), kernel_size=7)
    assert torch.equal(y[0], x[0])  # sigma 0: untouched
    assert y[1].std() < 0.6 * x[1].std()
    torch.testing.assert_close(y[2], x[2])  # constant stays constant (reflected edges)
    torch.testing.assert_close(y[1].mean(), x[1].mean(), atol=0.02, rtol=0)


def test_presets():
    assert [v.size for v in imagenet_views("single")] == [224]
    two = imagenet_views("two")
    assert [v.blur for v in two] == [0.5, 0.1] and [v.solarize for v in two] == [0.0, 0.2]
    multi = imagenet_views("multicrop")
    assert [v.size for v in multi] == [224] * 2 + [96] * 6
    assert multi[0].scale == (0.14, 1.0) and multi[-1].scale == (0.05, 0.14)
    assert ViewSpec(224).blur_kernel == 23 and ViewSpec(96).blur_kernel == 9
    with pytest.raises(ValueError, match="unknown view recipe 'three'"):
        imagenet_views("three")


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(size=0), "size must be a positive int"),
    (dict(size=8.0), "size must be a positive int"),
    (dict(size=8, scale=(0.5, 0.2)), "scale must satisfy"),
    (dict(size=8, scale=(0.5, 1.5)), "at most 1"),
    (dict(size=8, ratio=(0.0, 1.0)), "ratio must satisfy"),
    (dict(size=8, ratio=1.0), "ratio must be a pair"),
    (dict(size=8, hflip=1.5), "hflip is a probability"),
    (dict(size=8, blur=-0.1), "blur is a probability"),
    (dict(size=8, brightness=-1), "brightness must be >= 0"),
    (dict(size=8, hue=0.7), "hue is a fraction of a turn"),
    (dict(size=8, max_rotation=-5), "max_rotation"),
    (dict(size=8, max_translate=2), "max_translate"),
])
def test_invalid_view_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViewSpec(**kwargs)


def test_invalid_module_arguments():
    assert ViewSpec(8, scale=[0.2, 0.9]).scale == (0.2, 0.9)
    with pytest.raises(ValueError, match="non-empty sequence of ViewSpec"):
        Augment([], [0.5], [0.5])
    with pytest.raises(ValueError, match="one value per channel"):
        Augment([ViewSpec(8)], [0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="std must be positive"):
        Augment([ViewSpec(8)], [0.5], [0.0])
    aug = Augment([ViewSpec(8)], [0.5], [0.5])
    with pytest.raises(ValueError, match="shape"):
        aug(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 images or floats"):
        aug(torch.zeros(1, 1, 8, 8, dtype=torch.int32))
