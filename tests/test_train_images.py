"""Image sources: shards in ImageNet's layout (round trip, shuffling, splitting, bad input) and
tensors in memory (epochs, rank slices)."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from streamcoke.data import DataError
from streamcoke.train.images import (ImageBatch, ImageShardSource, TensorImageSource, decode_square_image,
                                     load_digits_images, parse_int_field, rank_slice, write_synthetic_image_shards)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """30 samples of 3 classes, 32 px, in 4 shards (8 + 8 + 8 + 6)."""
    d = tmp_path_factory.mktemp("shards")
    return write_synthetic_image_shards(d, 30, 3, size=32, shard_size=8), d


def read(source, epoch=0):
    source.set_epoch(epoch)
    batches = list(source)
    assert all(isinstance(b, ImageBatch) and b.images.dtype == torch.uint8 for b in batches)
    return batches, [k for b in batches for k in b.keys], torch.cat([b.index for b in batches]).tolist()


def jpeg(arr, quality=95):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def sample(key, i, cls=0, image=None):
    image = jpeg(np.full((12, 12, 3), 40 * (i % 6), np.uint8)) if image is None else image
    return {"__key__": key, "jpg": image, "cls": str(cls).encode(), "idx": str(i).encode()}


# ------------------------------------------------------------------------------------ shards
def test_round_trip(shards):
    pattern, d = shards
    assert pattern.endswith("synthetic-{000000..000003}.tar")
    batches, keys, index = read(ImageShardSource(pattern, batch_size=7, load_size=16))
    assert index == list(range(30)) and [len(b) for b in batches] == [7, 7, 7, 7, 2]
    b = batches[0]
    assert b.images.shape == (7, 3, 16, 16) and b.index.dtype == b.target.dtype == torch.int64
    # class-major keys as the converter writes them; sample i of class i % 3
    assert keys[:3] == ["class_0000/0000000", "class_0000/0000003", "class_0000/0000006"]
    target = torch.cat([b.target for b in batches]).tolist()
    assert target == [int(k[6:10]) for k in keys] == [0] * 10 + [1] * 10 + [2] * 10
    nolabel = read(ImageShardSource(pattern, batch_size=30, load_size=8, label_field=None))[0]
    assert nolabel[0].target.tolist() == [-1] * 30
    dropped = read(ImageShardSource(pattern, batch_size=7, load_size=8, drop_last=True))[0]
    assert [len(b) for b in dropped] == [7] * 4


def test_synthetic_classes_differ(shards):
    (b,) = read(ImageShardSource(shards[0], batch_size=30, load_size=32))[0]
    mean_colour = torch.stack([b.images[b.target == c].float().mean((0, 2, 3)) for c in range(3)])
    assert torch.cdist(mean_colour, mean_colour)[~torch.eye(3, dtype=torch.bool)].min() > 20


def test_shuffle_is_seeded_by_epoch(shards):
    src = ImageShardSource(shards[0], batch_size=8, load_size=8, shuffle_buffer=10, seed=3)
    _, k0, i0 = read(src, 0)
    assert k0 == read(src, 0)[1] and k0 != read(src, 1)[1]
    assert sorted(i0) == list(range(30)) and i0 != sorted(i0)


def test_ranks_and_workers_read_disjoint_shards(shards, monkeypatch):
    pattern = shards[0]
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(read(ImageShardSource(pattern, batch_size=8, load_size=8, shuffle_buffer=4), epoch=1)[2])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(30))
    assert len(seen[0]) in (14, 16)  # whole shards: two of the four each
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    index = read(ImageShardSource(pattern, batch_size=5, load_size=8, num_workers=2))[2]
    assert sorted(index) == list(range(30))


def test_decode_resizes_the_shorter_side_and_keeps_the_centre():
    arr = np.zeros((48, 96, 3), np.uint8)
    arr[:, :24] = (0, 200, 0)
    arr[:, 24:72] = (200, 0, 0)
    arr[:, 72:] = (0, 200, 0)
    for data in (jpeg(arr), _png(arr)):
        out = decode_square_image(data, 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        assert np.abs(out[1:-1, 1:-1].astype(int) - (200, 0, 0)).max() < 30  # all red: the green sides are cut
    grey = _png(np.full((20, 30), 77, np.uint8))
    assert (decode_square_image(grey, 10) == 77).all()


def test_jpeg_draft_decode_matches_a_full_decode():
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    data = jpeg(np.asarray(coarse.resize((640, 480), Image.Resampling.BICUBIC)))  # smooth, 4:3
    fast = decode_square_image(data, 60).astype(float)  # decoded at 1/8 scale
    with Image.open(io.BytesIO(data)) as img:
        full = np.asarray(img.convert("RGB").resize((60, 60), Image.Resampling.BILINEAR, box=(80, 0, 560, 480)))
    assert np.abs(fast - full).mean() < 1.5


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_image_names_shard_and_key(tmp_path):
    samples = [sample(f"k{i}", i) for i in range(5)]
    samples[1]["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    samples[3]["jpg"] = samples[3]["jpg"][:60]  # truncated JPEG
    path = write_tar(tmp_path / "bad.tar", samples)
    with pytest.raises(DataError, match=r"undecodable image.*bad\.tar.*sample 'k1'"):
        read(ImageShardSource(path, batch_size=2, load_size=8))
    src = ImageShardSource(path, batch_size=2, load_size=8, on_error="skip")
    assert read(src)[2] == [0, 2, 4] and src.skipped == 2


def test_skips_are_counted_through_workers(tmp_path):
    paths = []
    for s in range(2):
        samples = [sample(f"s{s}k{i}", 10 * s + i) for i in range(4)]
        samples[s]["jpg"] = b"junk"
        paths.append(write_tar(tmp_path / f"w{s}.tar", samples))
    src = ImageShardSource(paths, batch_size=4, load_size=8, on_error="skip", num_workers=2)
    assert sorted(read(src)[2]) == [1, 2, 3, 10, 12, 13] and src.skipped == 2


@pytest.mark.parametrize(("change", "match"), [
    (lambda s: s.pop("idx"), r"missing index field 'idx' \(sample has: cls, jpg\)"),
    (lambda s: s.pop("cls"), "missing label field 'cls'"),
    (lambda s: s.pop("jpg"), "missing image field"),
    (lambda s: s.update(idx=b"1.5"), "field 'idx' is not a non-negative integer"),
    (lambda s: s.update(idx=b"-3"), "field 'idx' is not a non-negative integer"),
    (lambda s: s.update(cls=b"cat"), "field 'cls' is not a non-negative integer"),
])
def test_bad_fields_name_shard_and_key(tmp_path, change, match):
    samples = [sample(f"k{i}", i) for i in range(3)]
    change(samples[2])
    path = write_tar(tmp_path / "f.tar", samples)
    with pytest.raises(DataError, match=match + r".*f\.tar.*sample 'k2'"):
        read(ImageShardSource(path, batch_size=2, load_size=8))
    src = ImageShardSource(path, batch_size=2, load_size=8, on_error="skip")
    assert read(src)[2] == [0, 1] and src.skipped == 1


@pytest.mark.parametrize("cut", ["mid-block", "at a header"])
def test_truncated_shard(shards, tmp_path, cut):
    pattern, d = shards
    data = (d / "synthetic-000001.tar").read_bytes()
    # 20480 bytes in is a member's header: tarfile alone would read the cut file as complete
    (tmp_path / "cut.tar").write_bytes(data[: 20480 + (100 if cut == "mid-block" else 0)])
    urls = [str(d / "synthetic-000000.tar"), str(tmp_path / "cut.tar"), str(d / "synthetic-000002.tar")]
    with pytest.raises(DataError, match=r"unreadable shard.*cut\.tar"):
        read(ImageShardSource(urls, batch_size=8, load_size=8))
    src = ImageShardSource(urls, batch_size=8, load_size=8, on_error="skip")
    index = read(src)[2]
    assert src.skipped >= 1 and index[:8] == list(range(8)) and index[-8:] == list(range(16, 24))
    assert 0 < len(index) - 16 < 8 and set(index[8:-8]) <= set(range(8, 16))  # read before the damage


def test_parse_int_field_and_arguments():
    assert parse_int_field(b" 42\n", "idx") == 42
    with pytest.raises(ValueError, match="not a non-negative integer"):
        parse_int_field(b"", "cls")
    with pytest.raises(ValueError, match="on_error"):
        ImageShardSource("x.tar", batch_size=2, on_error="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        ImageShardSource("x.tar", batch_size=0)


# ------------------------------------------------------------------------------------ memory
def test_tensor_source_epochs():
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 1, 4, 4).contiguous()
    targets = torch.arange(23) % 5
    src = TensorImageSource(images, targets, batch_size=5, seed=1)
    assert len(src) == 5
    orders = []
    for epoch in (0, 1, 0):
        src.set_epoch(epoch)
        batches = list(src)
        index = torch.cat([b.index for b in batches])
        assert sorted(index.tolist()) == list(range(23)) and [len(b) for b in batches] == [5, 5, 5, 5, 3]
        for b in batches:
            assert torch.equal(b.images[:, 0, 0, 0].long(), b.index) and torch.equal(b.target, b.index % 5)
            assert b.keys == [str(i) for i in b.index.tolist()]
        orders.append(index.tolist())
    assert orders[0] == orders[2] != orders[1] and orders[0] != sorted(orders[0])
    dropped = TensorImageSource(images, batch_size=5, drop_last=True, shuffle=False)
    assert len(dropped) == 4 and [b.index.tolist()[0] for b in dropped] == [0, 5, 10, 15]
    assert next(iter(dropped)).target.tolist() == [-1] * 5


def test_rank_slice_matches_one_process_with_the_global_batch():
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    world, batch = 3, 2
    one = rank_slice(perm, batch * world, 0, 1)
    parts = [rank_slice(perm, batch, r, world) for r in range(world)]
    assert all(len(p) == len(one) == 4 for p in parts)  # equal batch counts: no rank waits in a collective
    for t, glob in enumerate(one):
        assert torch.equal(torch.cat([p[t] for p in parts]), glob)
        if len(glob) == batch * world:
            assert all(len(p[t]) == batch for p in parts)
    assert [len(p[-1]) for p in parts] == [2, 2, 1]  # 23 = 3 * 6 + 5: the short batch cut evenly
    assert all(len(p) == 3 for p in (rank_slice(perm, batch, r, world, drop_last=True) for r in range(world)))
    with pytest.raises(ValueError, match="rank"):
        rank_slice(perm, 2, 3, 3)


def test_tensor_source_arguments():
    with pytest.raises(ValueError, match="uint8 tensor"):
        TensorImageSource(torch.zeros(3, 1, 4, 4), batch_size=2)
    with pytest.raises(ValueError, match="targets must be 3 integers"):
        TensorImageSource(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(4), batch_size=2)


def test_load_digits_images():
    images, target = load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8 and images.max() == 255
    assert target.dtype == torch.int64 and target.unique().tolist() == list(range(10))
