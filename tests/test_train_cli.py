"""`streamcoke pretrain`, `embed` and `eval` end to end on a tiny recipe."""

import json

import pyarrow.parquet as pq
import pytest

from streamcoke.cli import main
from streamcoke.train.images import write_synthetic_image_shards

TINY_TOML = """
encoder = "small"
encoder_width = 4
projection_dims = [16, 8]
predictor_dims = [16, 8]
n_clusters = [10, 12]
views = "small"
image_size = 8
load_size = 8
mean = [0.31]
std = [0.38]
epochs = 2
batch_size = 300
optimizer = "sgd"
lr = 0.05
warmup_epochs = 0
stage2_epoch = 0
precision = "fp32"
channels_last = false
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return str(path)


def test_pretrain_on_digits_reports_against_baselines_then_embed_and_eval(tmp_path, tiny_recipe, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--recipe", tiny_recipe, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for row in ("raw pixels", "untrained encoder", "CoKe-trained encoder"):
        assert row in printed
    scores = json.loads((out / "eval.json").read_text())
    assert scores["raw pixels"]["ACC"] > 0.6  # k-means on pixels is a real baseline

    assert main(["embed", str(out / "checkpoint.st"), "--out", str(tmp_path / "f.parquet"), "--quiet"]) == 0
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.num_rows == 1797 and table.column("index").to_pylist() == list(range(1797))

    assert main(["eval", str(out / "checkpoint.st"), "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    evaluated = json.loads((tmp_path / "s.json").read_text())
    assert evaluated["knn_top1"] == pytest.approx(scores["CoKe-trained encoder"]["knn_top1"], abs=1e-6)


def test_pretrain_resume_continues_to_more_epochs(tmp_path, tiny_recipe, capsys):
    out = tmp_path / "run"
    main(["pretrain", "--recipe", tiny_recipe, "--out", str(out), "--quiet", "--epochs", "1"])
    assert main(["pretrain", "--recipe", tiny_recipe, "--out", str(out), "--quiet", "--epochs", "2", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    from streamcoke.train import CoKeTrainer

    resumed = CoKeTrainer.load(out / "checkpoint.st")
    assert resumed.epoch == 2 and [row["epoch"] for row in resumed.history] == [0, 1]
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["pretrain", "--recipe", tiny_recipe, "--out", str(tmp_path / "none"), "--resume"])


def test_pretrain_from_shards_needs_the_sample_count_then_trains_and_evaluates(tmp_path, tiny_recipe):
    pattern = write_synthetic_image_shards(tmp_path / "shards", 24, 2, size=16, shard_size=24)
    with pytest.raises(SystemExit, match="--n-samples is required"):
        main(["pretrain", pattern, "--recipe", tiny_recipe])
    rgb = tmp_path / "rgb.toml"
    rgb.write_text(TINY_TOML.replace("mean = [0.31]", "mean = [0.5, 0.5, 0.5]").replace(
        "std = [0.38]", "std = [0.25, 0.25, 0.25]").replace("n_clusters = [10, 12]", "n_clusters = [2, 3]")
        .replace("batch_size = 300", "batch_size = 8"))
    assert main(["pretrain", pattern, "--recipe", str(rgb), "--n-samples", "24", "--out", str(tmp_path / "r"),
                 "--quiet", "--num-workers", "0", "--shuffle-buffer", "8"]) == 0
    assert main(["eval", str(tmp_path / "r" / "checkpoint.st"), pattern, "--quiet", "--num-workers", "0",
                 "--n-clusters", "2"]) == 0


@pytest.mark.slow
def test_builtin_digits_run_reaches_the_quality_targets(tmp_path):
    """The default `streamcoke pretrain` (about a minute on two cores): k-NN top-1 >= 0.97 and
    k-means ACC >= 0.90 on the learned features, above the untrained encoder."""
    assert main(["pretrain", "--out", str(tmp_path), "--quiet"]) == 0
    scores = json.loads((tmp_path / "eval.json").read_text())
    trained, untrained = scores["CoKe-trained encoder"], scores["untrained encoder"]
    assert trained["knn_top1"] >= 0.97 and trained["ACC"] >= 0.90
    assert trained["ACC"] > untrained["ACC"] + 0.1
