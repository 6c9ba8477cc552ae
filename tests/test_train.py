"""The CoKe trainer: label memory, loss, schedule, exact resume, bad input, shards end to end."""

import math

import numpy as np
import pytest
import torch

from streamcoke.train import CoKeTrainer, LabelMemory, Recipe, TensorImageSource, load_recipe
from streamcoke.train.images import ImageShardSource, write_synthetic_image_shards
from streamcoke.train.loss import IGNORE, coke_loss, sharpened_histogram
from streamcoke.train.recipe import builtin_recipes

TINY = dict(encoder="small", encoder_width=4, projection_dims=(16, 8), predictor_dims=(16, 8),
            n_clusters=(3, 5), views="small", image_size=8, load_size=8, mean=(0.5,), std=(0.25,),
            epochs=3, batch_size=8, optimizer="sgd", lr=0.05, warmup_epochs=1, stage2_epoch=None,
            precision="fp32", channels_last=False, seed=0)


def tiny(**changes) -> Recipe:
    return Recipe(**{**TINY, **changes})


def images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------- memory
def test_memory_serves_previous_epoch_labels_only():
    mem = LabelMemory(6, 2)
    idx = torch.tensor([0, 3, 5])
    mem.write(idx, torch.tensor([[1, 2], [0, 1], [2, 0]]))
    assert (mem.previous(idx) == IGNORE).all()  # epoch 0: nothing before it
    mem.end_epoch()
    mem.write(idx, torch.tensor([[9, 9], [9, 9], [9, 9]]))  # this epoch's labels are not served
    assert mem.previous(idx).tolist() == [[1, 2], [0, 1], [2, 0]]
    assert (mem.previous(torch.tensor([1, 2])) == IGNORE).all()
    assert mem.coverage() == pytest.approx(0.5)
    # stored in half the memory of int64, served as the int64 a loss indexes with
    assert mem.labels.dtype == torch.int32
    assert mem.previous(idx).dtype == mem.recent(idx).dtype == torch.int64


def test_memory_history_and_stale_labels_cleared():
    mem = LabelMemory(3, 1, history=2)
    for e in range(4):
        mem.write(torch.tensor([0, 1] if e != 2 else [0]), torch.full((2 if e != 2 else 1, 1), e))
        mem.end_epoch()
    recent = mem.recent(torch.tensor([0, 1]))
    assert recent[:, :, 0].tolist() == [[3, 2], [3, IGNORE]]  # sample 1 was not seen in epoch 2


def test_memory_rejects_indices_outside():
    mem = LabelMemory(4, 1)
    with pytest.raises(ValueError, match="sample index 4 .*outside the label memory of 4"):
        mem.write(torch.tensor([1, 4]), torch.zeros(2, 1, dtype=torch.int64))
    assert (mem.labels == IGNORE).all()


# --------------------------------------------------------------------------------- loss
def test_coke_loss_is_cross_entropy_against_fixed_centers():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1).requires_grad_()
    centers = torch.nn.functional.normalize(torch.randn(2 + 3, 4, generator=g), dim=1)
    targets = torch.tensor([[0, 2], [1, 0], [1, IGNORE], [0, 1], [1, 2]])
    loss = coke_loss(z, centers, (2, 3), targets, temperature=0.5)
    logits = z @ centers.T / 0.5
    ce0 = torch.nn.functional.cross_entropy(logits[:, :2], targets[:, 0])
    keep = targets[:, 1] != IGNORE
    ce1 = torch.nn.functional.cross_entropy(logits[keep, 2:], targets[keep, 1])
    assert float(loss.detach()) == pytest.approx(float((ce0 + ce1).detach() / 2), rel=1e-6)
    loss.backward()
    assert z.grad is not None and centers.grad is None


def test_soft_labels_sharpen_recent_assignments():
    p = sharpened_histogram(torch.tensor([[1, 1, 0, IGNORE]]), 3, temperature=0.5)
    assert p[0].tolist() == pytest.approx([1 / 5, 4 / 5, 0.0])


# ------------------------------------------------------------------------------ recipes
def test_builtin_recipes_load_and_bad_recipes_are_named(tmp_path):
    assert {"digits", "imagenet-single", "imagenet-two", "imagenet-multicrop"} <= set(builtin_recipes())
    single = load_recipe("imagenet-single")
    assert (single.n_clusters, single.lr, single.batch_size, single.stage2_epoch) == ((3000, 4000, 5000), 1.6, 1024, 801)
    bad = tmp_path / "bad.toml"
    bad.write_text('n_clusters = [10]\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        load_recipe(str(bad))
    with pytest.raises(ValueError, match="views must be one of"):
        tiny(views="three")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    # a predictor whose loss weighs nothing is dropped (DDP rejects parameters without gradients)
    assert tiny(predictor_weight=0.0).predictor_dims is None
    assert tiny(predictor_dims=()).predictor_weight == 0.0


# ------------------------------------------------------------------------------ trainer
def test_epoch_zero_only_clusters_then_training_uses_previous_labels():
    trainer = CoKeTrainer(tiny(), n_samples=24, device="cpu")
    before = [p.detach().clone() for p in trainer.network.parameters()]
    source = TensorImageSource(images(), batch_size=8)
    row = trainer.train_epoch(source, progress=False)
    assert math.isnan(row["loss"]) and row["lr"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    assert trainer.memory.coverage() == 1.0
    row = trainer.train_epoch(source, progress=False)
    assert row["labelled"] == 1.0 and np.isfinite(row["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_learning_rate_warms_up_then_decays():
    trainer = CoKeTrainer(tiny(epochs=5, warmup_epochs=1), n_samples=24, device="cpu")
    spe = trainer.steps_per_epoch
    lrs = [trainer.lr_at(s // spe, s % spe) for s in range(5 * spe)]
    assert lrs[:spe] == [0.0] * spe
    peak = int(np.argmax(lrs))
    assert lrs[peak] == pytest.approx(0.05, rel=1e-6) and peak == 2 * spe
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_clusterings_larger_than_a_batch_are_seeded_from_several_batches():
    trainer = CoKeTrainer(tiny(n_clusters=(20,)), n_samples=24, device="cpu")
    trainer.train_epoch(TensorImageSource(images(), batch_size=8), progress=False)
    assert trainer.memory.coverage() == 1.0
    small = CoKeTrainer(tiny(n_clusters=(30,)), n_samples=24, device="cpu")
    with pytest.raises(ValueError, match="too small to seed 30 clusters"):
        small.train_epoch(TensorImageSource(images(), batch_size=8), progress=False)


def test_stage_two_trains_on_soft_labels_and_averaged_centers():
    trainer = CoKeTrainer(tiny(epochs=4, stage2_epoch=2, stage2_history=2), n_samples=24, device="cpu")
    trainer.fit(TensorImageSource(images(), batch_size=8), progress=False)
    assert len(trainer.center_history) == 2 and trainer.memory.recent(torch.arange(3)).shape == (3, 2, 2)
    assert all(np.isfinite(r["loss"]) for r in trainer.history[1:])


def test_two_views_and_projection_branch():
    recipe = tiny(predictor_weight=0.5, small_views=2)
    trainer = CoKeTrainer(recipe, n_samples=24, device="cpu")
    assert len(trainer.augment.views) == 2
    trainer.fit(TensorImageSource(images(), batch_size=8), epochs=2, progress=False)
    assert np.isfinite(trainer.history[-1]["loss"])


def _state(tr):
    tensors, meta = tr.state()
    return {k: v.clone() for k, v in tensors.items() if not k.startswith("rng.")}


def test_resume_mid_epoch_is_exact(tmp_path):
    data = images(40)
    full = CoKeTrainer(tiny(), n_samples=40, device="cpu")
    full.fit(TensorImageSource(data, batch_size=8), progress=False)

    part = CoKeTrainer(tiny(), n_samples=40, device="cpu")
    source = TensorImageSource(data, batch_size=8)
    part.train_epoch(source, progress=False)
    source.set_epoch(1)
    for i, batch in enumerate(source):  # stop in the middle of epoch 1
        if i == 2:
            break
        part.train_step(batch.images, batch.index)
    part.save(tmp_path / "ck.st")
    resumed = CoKeTrainer.load(tmp_path / "ck.st", device="cpu")
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 2)
    resumed.fit(TensorImageSource(data, batch_size=8), progress=False)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _CrashIn:
    """A source that fails after ``after`` batches of epoch ``epoch``, as a killed run would."""

    def __init__(self, source, epoch, after):
        self.source, self.epoch, self.after, self.current = source, epoch, after, 0

    def set_epoch(self, epoch):
        self.current = epoch
        self.source.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.source):
            if self.current == self.epoch and i == self.after:
                raise RuntimeError("killed")
            yield batch


# (12,) with batches of 8: the first batch is held back to seed the clusterer, and the
# checkpoint due after it is skipped (saving then is refused).
@pytest.mark.parametrize("n_clusters, every, last_step", [((3, 5), 2, 2), ((12,), 1, 3)])
def test_checkpoint_steps_resume_an_interrupted_fit_exactly(tmp_path, n_clusters, every, last_step):
    data = images(40)
    recipe = tiny(n_clusters=n_clusters)
    full = CoKeTrainer(recipe, n_samples=40, device="cpu")
    full.fit(TensorImageSource(data, batch_size=8), progress=False)

    part = CoKeTrainer(recipe, n_samples=40, device="cpu")
    with pytest.raises(RuntimeError, match="killed"):
        part.fit(_CrashIn(TensorImageSource(data, batch_size=8), epoch=1, after=3), out_dir=tmp_path,
                 progress=False, checkpoint_steps=every)
    resumed = CoKeTrainer.load(tmp_path / "checkpoint.st", device="cpu")
    assert (resumed.epoch, resumed.step_in_epoch) == (1, last_step)  # the last checkpoint before the failure
    resumed.fit(TensorImageSource(data, batch_size=8), out_dir=tmp_path, progress=False, checkpoint_steps=every)
    a, b = _state(full), _state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="checkpoint_steps"):
        resumed.fit(TensorImageSource(data, batch_size=8), checkpoint_steps=-1)


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    trainer = CoKeTrainer(tiny(), n_samples=24, device="cpu")
    trainer.train_epoch(TensorImageSource(images(), batch_size=8), progress=False)
    trainer.save(tmp_path / "ck.st")
    with pytest.raises(ValueError, match=r"another configuration: n_clusters=\[3, 5\] \(now \[4, 5\]\)"):
        CoKeTrainer.load(tmp_path / "ck.st", recipe=tiny(n_clusters=(4, 5)))
    CoKeTrainer.load(tmp_path / "ck.st", recipe=tiny(epochs=9))  # more epochs is a resumable change
    (tmp_path / "junk.st").write_bytes(b"\x80\x04K\x01.")  # a pickle, never unpickled
    with pytest.raises(ValueError, match="not a streamcoke checkpoint"):
        CoKeTrainer.load(tmp_path / "junk.st")


def test_shards_whose_indices_do_not_fit_the_memory_fail_clearly(tmp_path):
    pattern = write_synthetic_image_shards(tmp_path, 12, 2, size=16, shard_size=6)
    trainer = CoKeTrainer(tiny(n_clusters=(2,), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), n_samples=10,
                          device="cpu")
    with pytest.raises(ValueError, match="sample index 1[01] .*outside the label memory of 10 samples"):
        trainer.train_epoch(ImageShardSource(pattern, 4, load_size=8), progress=False)


def test_trains_from_jpeg_shards_and_writes_report(tmp_path):
    pattern = write_synthetic_image_shards(tmp_path / "shards", 32, 2, size=24, shard_size=16)
    recipe = tiny(n_clusters=(2, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), load_size=16)
    trainer = CoKeTrainer(recipe, n_samples=32, device="cpu")
    source = ImageShardSource(pattern, 8, load_size=16, shuffle_buffer=16)
    history = trainer.fit(source, out_dir=tmp_path / "run", progress=False)
    assert len(history) == 3 and trainer.memory.coverage() == 1.0
    for name in ("checkpoint.st", "training.png", "cluster_sizes.png", "gallery.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name


def test_torchvision_resnet_encoder_trains():
    pytest.importorskip("torchvision")
    recipe = tiny(encoder="resnet18", projection_dims=(64, 16), predictor_dims=(64, 16), image_size=32,
                  load_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), views="single", epochs=2)
    trainer = CoKeTrainer(recipe, n_samples=16, device="cpu")
    data = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    trainer.fit(TensorImageSource(data, batch_size=8), progress=False)
    assert np.isfinite(trainer.history[-1]["loss"])
    assert trainer.encode(data[:4]).shape == (4, 512)


@pytest.mark.gpu
def test_trainer_on_cuda_with_bfloat16():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    recipe = tiny(precision="bf16", channels_last=True)
    trainer = CoKeTrainer(recipe, n_samples=24, device="cuda")
    trainer.fit(TensorImageSource(images(), batch_size=8), progress=False)
    assert np.isfinite(trainer.history[-1]["loss"]) and trainer.clusterer.device_.type == "cuda"


@pytest.mark.parametrize("views, n_views", [("two", 2), ("multicrop", 8)])
def test_imagenet_view_recipes_train_at_a_small_size(views, n_views):
    recipe = tiny(views=views, image_size=32, load_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                  predictor_weight=0.5, epochs=2)
    trainer = CoKeTrainer(recipe, n_samples=16, device="cpu")
    assert len(trainer.augment.views) == n_views
    data = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    trainer.fit(TensorImageSource(data, batch_size=8), progress=False)
    assert np.isfinite(trainer.history[-1]["loss"]) and trainer.memory.coverage() == 1.0


def test_default_device_is_this_ranks_gpu(monkeypatch):
    from streamcoke import distributed
    from streamcoke.cluster._base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.default_device() == resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.default_device() == torch.device("cuda", 0)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's rank on this machine, set_device never called
    assert distributed.default_device() == resolve_device(None) == torch.device("cuda", 3)
