from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from deepnets.config import load_config
from deepnets.data import (
    InMemoryDataModule,
    TensorBatches,
    flip_labels,
    in_huge_pages,
    load_splits,
    random_crop_flip,
    zca_matrix,
)
from deepnets.errors import UserError


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of MNIST: magic (0, 0, dtype 0x08, ndim), big-endian dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_cifar(root: Path, n_per_batch: int = 10) -> None:
    """The python-pickle CIFAR-10 batches torchvision reads: dicts with 'data' (N, 3072) uint8 and 'labels'."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            "labels": list(np.arange(n_per_batch) % 10),
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def cfg_for(root: Path, name: str, *extra: str):
    return load_config(None, [f"data.name={name}", f"data.root={root}", "data.standardize=false", *extra]).data


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_reads_real_idx_files(tmp_path: Path, name: str) -> None:
    write_mnist(tmp_path, "MNIST" if name == "mnist" else "FashionMNIST")
    s = load_splits(cfg_for(tmp_path, name, "data.val_fraction=0.5"), seed=0)
    assert s.x_train.shape == (30, 1, 28, 28) and s.x_val.shape == (30, 1, 28, 28)
    assert s.x_test.shape == (20, 1, 28, 28) and s.y_test.tolist() == [i % 10 for i in range(20)]
    assert s.x_train.min() >= 0.0 and s.x_train.max() <= 1.0 and s.x_train.dtype == torch.float32


def test_reads_real_cifar_pickles(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    s = load_splits(cfg_for(tmp_path, "cifar10", "data.val_fraction=0.2"), seed=0)
    assert s.x_train.shape == (40, 3, 32, 32) and s.x_test.shape == (10, 3, 32, 32)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    expected = torch.tensor(raw["data"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.equal(s.x_test[0], expected)  # channel order and scaling as in the file


def test_missing_files_name_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_splits(cfg_for(tmp_path, "mnist"), seed=0)
    msg = str(err.value)
    assert f"data.root={tmp_path}" in msg and "train-images-idx3-ubyte" in msg and "data.download=true" in msg


def test_truncated_file_is_named(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{bad}: corrupt or truncated"):
        load_splits(cfg_for(tmp_path, "mnist"), seed=0)


def test_corrupt_cifar_batch_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3: corrupt or truncated"):
        load_splits(cfg_for(tmp_path, "cifar10"), seed=0)


def test_label_noise_flips_exactly_the_fraction() -> None:
    y = torch.arange(1000) % 10
    noisy = flip_labels(y, 0.15, 10, seed=3)
    assert int((noisy != y).sum()) == 150
    assert torch.equal(noisy, flip_labels(y, 0.15, 10, seed=3))  # seeded
    data = load_config(None, ["data.label_noise=0.2"]).data
    clean = load_splits(load_config(None, []).data, seed=0)
    s = load_splits(data, seed=0)
    assert int((s.y_train != clean.y_train).sum()) == round(0.2 * len(clean.y_train))
    assert torch.equal(s.y_test, clean.y_test)  # only the training labels are touched


def test_splits_are_disjoint_and_seeded() -> None:
    data = load_config(None, ["data.train_size=500"]).data
    a, b = load_splits(data, seed=0), load_splits(data, seed=1)
    assert len(a.y_train) == 500 and torch.equal(a.x_train, b.x_train)
    rows = lambda x: {tuple(r.tolist()) for r in x.flatten(1)}  # noqa: E731
    assert not rows(a.x_train) & rows(a.x_test) and not rows(a.x_val) & rows(a.x_test)
    with pytest.raises(UserError, match="data.train_size=5000 exceeds"):
        load_splits(load_config(None, ["data.train_size=5000"]).data, seed=0)


def test_standardisation_uses_training_statistics() -> None:
    s = load_splits(load_config(None, ["data.standardize=true"]).data, seed=0)
    assert abs(float(s.x_train.mean())) < 1e-5 and abs(float(s.x_train.std()) - 1) < 1e-3
    assert abs(float(s.x_test.mean())) > 1e-5  # test statistics were not used


def test_zca_whitened_training_data_has_identity_covariance() -> None:
    g = torch.Generator().manual_seed(0)  # a random mixing matrix can be near-singular: eps would then show
    x = torch.randn(2000, 6, generator=g) @ torch.randn(6, 6, generator=g)  # correlated
    mean, W = zca_matrix(x, eps=1e-6)
    z = (x - mean) @ W
    cov = z.T @ z / (len(z) - 1)
    assert torch.allclose(cov, torch.eye(6), atol=1e-3)
    assert torch.allclose(W, W.T, atol=1e-5)  # ZCA (not PCA) whitening is symmetric


def test_loader_yields_every_sample_once_per_epoch_in_seeded_order() -> None:
    x = torch.arange(103).float().unsqueeze(1)
    loader = TensorBatches(x, torch.arange(103), batch_size=10, shuffle=True, seed=7)
    assert len(loader) == 11
    epochs = [torch.cat([xb for xb, _ in loader]).squeeze(1).long() for _ in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(103))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    again = TensorBatches(x, torch.arange(103), batch_size=10, shuffle=True, seed=7)
    assert torch.equal(torch.cat([xb for xb, _ in again]).squeeze(1).long(), epochs[0])
    assert torch.equal(epochs[0], torch.randperm(103, generator=torch.Generator().manual_seed(7)))


def test_loader_resumes_mid_epoch() -> None:
    x = torch.arange(50).float()
    full = TensorBatches(x, x.long(), batch_size=5, shuffle=True, seed=1)
    reference = [xb for xb, _ in full] + [xb for xb, _ in full]
    first = TensorBatches(x, x.long(), batch_size=5, shuffle=True, seed=1)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 0, "consumed": 3}
    resumed = TensorBatches(x, x.long(), batch_size=5, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    rest = [xb for xb, _ in resumed] + [xb for xb, _ in resumed]
    assert all(torch.equal(a, b) for a, b in zip(reference[3:], rest, strict=True))


def test_ranks_get_disjoint_equal_shards() -> None:
    x = torch.arange(101).float()
    shards = [TensorBatches(x, x.long(), 8, shuffle=True, seed=0, rank=r, world_size=2).indices(0) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_crop_flip_keeps_shape_and_content() -> None:
    x = torch.rand(16, 3, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # a crop of the zero-padded image: every output row is a (possibly flipped, shifted) piece of the input
    assert torch.all((out == 0) | torch.isin(out, x))
    assert not torch.equal(out, x)


def test_datamodule_knows_shapes_before_reading() -> None:
    dm = InMemoryDataModule(load_config(None, []).data, seed=0)
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10 and dm.splits is None
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (128, 1, 8, 8) and yb.dtype == torch.int64


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_training_set_is_copied_into_huge_pages_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    import deepnets.data as data

    x = torch.randn(16 << 10, 1024)  # 64 MiB
    before = _anon_huge_kib() if Path("/proc/self/smaps_rollup").exists() else 0
    h = in_huge_pages(x)
    assert h.shape == x.shape and h.dtype == x.dtype and h.is_contiguous() and torch.equal(h, x)
    assert h.data_ptr() != x.data_ptr()  # a copy: writing to it leaves x alone
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert _anon_huge_kib() - before >= 2048  # at least one 2 MiB page
    expected = x.clone()
    del x
    gc.collect()
    assert torch.equal(h, expected)  # the mapping lives as long as the tensor
    small = torch.randn(10, 10)
    assert in_huge_pages(small) is small  # within the TLB's reach: left where it is

    placed: list[Tensor] = []
    monkeypatch.setattr(data, "in_huge_pages", lambda t: placed.append(t) or t)
    dm = InMemoryDataModule(load_config(None, []).data, seed=0)
    dm.setup("fit")
    assert len(placed) == 1 and placed[0] is dm.splits.x_train


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.num_samples=2"], "data.val_fraction=0.1 leaves an empty validation split"),
        (["data.num_samples=3", "data.test_fraction=0.5"], "data: the training split has 1 sample(s)"),
        (["data.test_fraction=0.999"], "data: the training split has 1 sample(s)"),
        (["data.train_size=1"], "check data.train_size"),
        (
            ["data.num_samples=4", "data.val_fraction=0", "data.test_fraction=0.1", "checkpoint.enabled=false"],
            "data.test_fraction=0.1: the test split is empty",
        ),
    ],
)
def test_splits_too_small_to_mean_anything_are_one_error(overrides: list[str], message: str) -> None:
    """A 1-sample training split (NaN standardisation, no BN statistics) or an empty val/test split
    would train and report `completed` with missing or NaN metrics: it is a UserError naming the key."""
    cfg = load_config(None, ["data.name=synthetic", *overrides])
    with pytest.raises(UserError, match=re.escape(message)):
        load_splits(cfg.data, seed=0)
