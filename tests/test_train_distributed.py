"""The trainer on two gloo processes: DDP, identical clusterers and label memories, every rank's
random state in the checkpoint."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamcoke import distributed
from streamcoke.train import CoKeTrainer, Recipe, TensorImageSource

WORLD = 2
RECIPE = dict(encoder="small", encoder_width=4, projection_dims=(16, 8), predictor_dims=(16, 8),
              n_clusters=(3, 5), views="small", image_size=8, load_size=8, mean=(0.5,), std=(0.25,),
              epochs=3, batch_size=16, optimizer="lars", lr=0.1, warmup_epochs=1, stage2_epoch=None,
              precision="fp32", channels_last=False, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_threads() -> list[str]:
    """Names of this process's native gloo threads (Linux: /proc/self/task/*/comm)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue
    return [n for n in names if "gloo" in n]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        images = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        trainer = CoKeTrainer(Recipe(**RECIPE), n_samples=48, device="cpu")
        assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
        trainer.fit(TensorImageSource(images, batch_size=RECIPE["batch_size"] // WORLD), progress=False)
        trainer.save(os.path.join(out_dir, "checkpoint.st"))  # a collective: every rank calls it
        tensors, _ = trainer.state()
        torch.save({k: v for k, v in tensors.items() if not k.startswith("rng.")},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # gloo names its threads (torch 2.13 here); where it does not, there is nothing to see.
        named = os.path.isdir("/proc/self/task") and bool(_backend_threads())
        trainer.release_process_group()
        distributed.leave()
        # Threads left to interpreter shutdown abort the process when they still release a
        # collective's tensors; leaving must have stopped them.
        if named:
            assert _backend_threads() == [], _backend_threads()
        assert trainer.model is trainer.network
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_state(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    per_row = ("cluster.labels", "cluster.assigned_similarity")  # the last batch's own rows of each rank
    differing = [k for k in r0 if k not in per_row and not torch.equal(r0[k], r1[k])]
    assert differing == []
    # every rank's memory holds every sample's label, written from both ranks' rows
    assert (r0["memory.labels"][(3 - 1) % 2] >= 0).all()
    from streamcoke.io.checkpoint import load_checkpoint

    saved, meta = load_checkpoint(tmp_path / "checkpoint.st", "streamcoke.CoKeTrainer")
    assert meta["world_size"] == 2 and saved["rng.augment"].shape[0] == 2
    assert not torch.equal(saved["rng.augment"][0], saved["rng.augment"][1])  # each rank its own stream


def test_pretrain_command_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m streamcoke.cli pretrain` on gloo: the process group comes
    from torchrun's environment, rank 0 writes the checkpoint and the built-in report."""
    import subprocess
    import sys

    from test_train_cli import TINY_TOML

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_TOML)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "streamcoke.cli", "pretrain", "--recipe",
                           str(recipe), "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and "CoKe-trained encoder" in done.stdout
    from streamcoke.train import CoKeTrainer

    trainer = CoKeTrainer.load(tmp_path / "run" / "checkpoint.st")
    assert trainer.epoch == 2 and trainer.memory.coverage() == 1.0
