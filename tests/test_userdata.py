"""The user's own data (data.name: csv | npz | folder): reading, errors, splits, training, resume, metrics."""

from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

from deepnets import memory
from deepnets.checkpoint import load_checkpoint
from deepnets.config import load_config
from deepnets.data import DATASETS, InMemoryDataModule, load_splits, preprocess
from deepnets.errors import UserError
from deepnets.models import build_model
from deepnets.run import train
from tests.conftest import run_cli

TINY_MODEL = [
    "model.arch=mlp",
    "model.depth=1",
    "model.width=8",
    "optim.lr=0.1",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def write_csv(path: Path, n: int = 83, *, labels: str = "str", seed: int = 0, missing_at: int | None = None) -> Path:
    """Features a, b, c and a class label column `kind` (strings or ints), separable by a + b."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).round(4)
    k = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    names = {"str": ["zebra", "ant", "moose"], "int": ["10", "2", "7"]}[labels]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "kind"])
        for i, (row, c) in enumerate(zip(x, k, strict=True)):
            values = [str(v) for v in row]
            if i == missing_at:
                values[1] = ""
            w.writerow([*values, names[c]])
    return path


def cfg_for(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY_MODEL, f"output_dir={tmp_path / 'runs'}", *overrides])


def csv_cfg(tmp_path: Path, path: Path, *overrides: str):
    return cfg_for(tmp_path, "name=csvrun", "data.name=csv", f"data.path={path}", "data.target=kind", *overrides)


# ---------------------------------------------------------------- CSV


def test_csv_string_labels_map_to_sorted_ids_and_values_are_the_files(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv")
    src = DATASETS["csv"].read(csv_cfg(tmp_path, path).data, "classification")
    assert src.classes == ["ant", "moose", "zebra"] and src.features == ["a", "b", "c"]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert torch.equal(src.x, torch.tensor([[float(r[c]) for c in "abc"] for r in rows], dtype=torch.float32))
    assert [src.classes[i] for i in src.y.tolist()] == [r["kind"] for r in rows]


def test_csv_integer_labels_sort_numerically(tmp_path: Path) -> None:
    src = DATASETS["csv"].read(csv_cfg(tmp_path, write_csv(tmp_path / "d.csv", labels="int")).data, "classification")
    assert src.classes == ["2", "7", "10"]  # not "10" < "2"


def test_csv_features_subset_and_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv")
    cfg = csv_cfg(tmp_path, path, "data.features=[c, a]")
    src = DATASETS["csv"].read(cfg.data, "classification")
    full = DATASETS["csv"].read(csv_cfg(tmp_path, path).data, "classification")
    assert src.features == ["c", "a"] and torch.equal(src.x, full.x[:, [2, 0]])


def test_csv_missing_value_names_line_and_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", missing_at=4)  # sample 4: file line 6 (header is line 1)
    with pytest.raises(UserError, match=r"d\.csv:6: missing value in column 'b' \(row 6 of the file\)"):
        load_splits(csv_cfg(tmp_path, path).data, 0)


def test_csv_non_numeric_value_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,kind\n1,2,x\n3,oops,y\n")
    with pytest.raises(UserError, match=r"d\.csv:3: non-numeric value 'oops' in column 'b'"):
        load_splits(csv_cfg(tmp_path, path).data, 0)


def test_csv_unknown_column_and_ragged_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv")
    with pytest.raises(UserError, match=r"data.target: .* has no column 'species' \(its columns: a, b, c, kind\)"):
        load_splits(cfg_for(tmp_path, "data.name=csv", f"data.path={path}", "data.target=species").data, 0)
    ragged = tmp_path / "r.csv"
    ragged.write_text("a,b,kind\n1,2,x\n3,y\n")
    with pytest.raises(UserError, match=r"r\.csv:3: 2 values, the header has 3 columns"):
        load_splits(csv_cfg(tmp_path, ragged).data, 0)


def test_cli_bad_csv_is_one_line_exit_2_nothing_written(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", missing_at=0)
    runs = tmp_path / "runs"
    r = run_cli(
        "--config",
        "mlp.yaml",
        *TINY_MODEL,
        "data.name=csv",
        f"data.path={path}",
        "data.target=kind",
        f"output_dir={runs}",
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: {path}:2: missing value in column 'b' (row 2 of the file)"]
    assert not runs.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.name=cvs"], "data.name: 'cvs' is not a dataset; did you mean csv?"),
        (["data.name=csv"], "data.path: data.name=csv reads a .csv file; set data.path"),
        (["data.name=csv", "data.path=x.csv"], "data.target: data.name=csv needs the target column"),
        (["data.name=folder", "data.path=x"], "data.image_size: data.name=folder needs [H, W]"),
        (["data.name=csv", "data.path=x.csv", "data.target=[u, v]"], "2 columns are regression targets"),
        (["data.name=csv", "data.path=x.csv", "data.target=k", "data.features=[a, k]"], "'k' is also data.target"),
        (
            ["task=regression", "data.name=csv", "data.path=x", "data.target=k", "data.label_noise=0.1"],
            "data.label_noise: 0.1 acts on class labels",
        ),
        (["task=regression", "data.name=folder", "data.path=x", "data.image_size=[8, 8]"], "needs numeric targets"),
        (["task=regression"], "data.name=digits is a classification dataset"),
        (["data.name=folder", "data.path=x", "data.image_size=[8]"], "data.image_size: [8] has 1 value"),
    ],
)
def test_config_load_checks_the_data_keys(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_files_checked_before_anything_is_written(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (tmp_path / "bad.npz").write_text("not a zip")
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "file").write_text("")
    cases = [
        (["data.name=csv", f"data.path={tmp_path / 'no.csv'}", "data.target=k"], "does not exist"),
        (["data.name=csv", f"data.path={tmp_path / 'dir.csv'}", "data.target=k"], "is not a file"),
        (["data.name=npz", f"data.path={tmp_path / 'bad.npz'}"], r"is not an \.npz file \(not a zip archive"),
        (["data.name=folder", f"data.path={tmp_path / 'file'}", "data.image_size=[8, 8]"], "is not a directory"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            train(cfg_for(tmp_path, *overrides))
    assert not runs.exists()
    # a run's config.yaml loads where its data is gone (export / predict need no training files)
    load_config(None, cases[0][0])


# ---------------------------------------------------------------- NPZ


def test_npz_with_test_arrays_and_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, xt = rng.normal(size=(40, 2, 3)), rng.normal(size=(9, 2, 3))
    y, yt = rng.choice(["b", "a"], 40), rng.choice(["a", "b"], 9)
    np.savez(tmp_path / "d.npz", inputs=x, labels=y, inputs_test=xt, labels_test=yt)
    over = ["data.name=npz", f"data.path={tmp_path / 'd.npz'}", "data.x_key=inputs", "data.y_key=labels"]
    cfg = cfg_for(tmp_path, *over, "data.standardize=false", "data.val_fraction=0.25")
    s = load_splits(cfg.data, 0)
    assert s.state["classes"] == ["a", "b"] and s.state["input_shape"] == [2, 3]
    assert torch.equal(s.x_test, torch.tensor(xt, dtype=torch.float32))  # the file's own test split, in order
    assert [["a", "b"][i] for i in s.y_test.tolist()] == list(yt)
    assert len(s.y_train) == 30 and len(s.y_val) == 10


def test_npz_object_array_is_refused_never_unpickled(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    cfg = cfg_for(tmp_path, "data.name=npz", f"data.path={tmp_path / 'o.npz'}")
    with pytest.raises(UserError, match="array 'x' is an object array .*refused"):
        load_splits(cfg.data, 0)


def test_npz_errors_name_the_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.array([0.5, 1, 2, 3]))
    cfg = cfg_for(tmp_path, "data.name=npz", f"data.path={tmp_path / 'd.npz'}")
    with pytest.raises(UserError, match="array 'y' is float64; classification needs integer or string labels"):
        load_splits(cfg.data, 0)
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 2)))
    with pytest.raises(UserError, match=r"data.y_key: .*e\.npz has no array 'y' \(its arrays: x\)"):
        load_splits(cfg_for(tmp_path, "data.name=npz", f"data.path={tmp_path / 'e.npz'}").data, 0)
    np.savez(tmp_path / "n.npz", x=np.array([[0.0], [np.nan]]), y=np.array([0, 1]))
    with pytest.raises(UserError, match=r"array 'x' holds nan at index \(1, 0\)"):
        load_splits(cfg_for(tmp_path, "data.name=npz", f"data.path={tmp_path / 'n.npz'}").data, 0)


def test_label_noise_with_user_classes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", n=200)
    clean = load_splits(csv_cfg(tmp_path, path).data, 0)
    noisy = load_splits(csv_cfg(tmp_path, path, "data.label_noise=0.5").data, 0)
    changed = int((clean.y_train != noisy.y_train).sum())
    assert changed == round(0.5 * len(clean.y_train)) and int(noisy.y_train.max()) <= 2


# ---------------------------------------------------------------- folders


def rgba_png(img: torch.Tensor) -> bytes:
    """A PNG of colour type 6 (RGBA), written by hand: torchvision's encode_png takes 1 or 3 channels."""
    _, h, w = img.shape
    rows = img.permute(1, 2, 0).numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _image(rng: np.random.Generator, c: int, h: int, w: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, 256, size=(c, h, w), dtype=np.uint8))


def write_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (12, 10), seed: int = 0) -> dict:
    """PNGs (RGB, grey, RGBA) and JPEGs per class; returns {relative path: the PNG's exact pixels}."""
    rng = np.random.default_rng(seed)
    exact = {}
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            channels = (3, 1, 4)[i % 3]
            img = _image(rng, channels, *size)
            if i % 4 == 3:
                write_file(str(root / c / f"{i:03d}.jpg"), encode_jpeg(img[:3] if channels == 4 else img, quality=95))
            else:
                data = rgba_png(img) if channels == 4 else bytes(encode_png(img).numpy())
                (root / c / f"{i:03d}.png").write_bytes(data)
                exact[f"{c}/{i:03d}.png"] = img
    (root / classes.__iter__().__next__() / "notes.txt").write_text("ignored: not an image")
    return exact


def _rgb(img: torch.Tensor) -> torch.Tensor:
    """The stated rule: grey replicated to 3 channels, alpha dropped."""
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]


def test_folder_flat_layout_decodes_to_rgb_uint8_exactly(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    exact = write_folder(root, {"dog": 7, "cat": 6})
    cfg = cfg_for(tmp_path, "data.name=folder", f"data.path={root}", "data.image_size=[12, 10]")
    src = DATASETS["folder"].read(cfg.data, "classification")
    assert src.classes == ["cat", "dog"] and src.x.dtype == torch.uint8 and src.x.shape == (13, 3, 12, 10)
    files = sorted((root / "cat").iterdir()) + sorted((root / "dog").iterdir())
    files = [f for f in files if f.suffix != ".txt"]
    for i, f in enumerate(files):
        rel = f"{f.parent.name}/{f.name}"
        if rel in exact:  # PNG is lossless: the very pixels written, by the stated RGB rule
            assert torch.equal(src.x[i], _rgb(exact[rel])), rel
    assert src.y.tolist() == [0] * 6 + [1] * 7


def test_folder_train_val_test_layout_resizes_and_keeps_uint8(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_folder(root / "train", {"a": 9, "b": 9}, size=(20, 16))
    write_folder(root / "test", {"a": 3, "b": 2}, size=(20, 16), seed=1)
    cfg = cfg_for(tmp_path, "data.name=folder", f"data.path={root}", "data.image_size=[10, 8]", "data.val_fraction=0.2")
    s = load_splits(cfg.data, 0)
    assert s.x_train.dtype == torch.uint8 and s.x_train.shape[1:] == (3, 10, 8)
    assert len(s.y_test) == 5 and s.y_test.tolist() == [0, 0, 0, 1, 1]
    assert len(s.y_train) + len(s.y_val) == 18
    # the statistics are those of x / 255 over the training split, per channel
    xf = s.x_train.double() / 255
    assert torch.allclose(s.state["mean"], xf.mean((0, 2, 3))[:, None, None].float(), atol=1e-6)
    assert torch.allclose(s.state["std"], xf.std((0, 2, 3))[:, None, None].float(), atol=1e-6)
    # a test class the training folder lacks is an error
    write_folder(root / "val", {"c": 1}, size=(20, 16))
    with pytest.raises(UserError, match=r"val/c is a class the training folder does not have"):
        load_splits(cfg.data, 0)


def test_folder_batches_are_preprocessed_on_the_device_and_augmented(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_folder(root, {"a": 10, "b": 10})
    over = ["data.name=folder", f"data.path={root}", "data.image_size=[12, 10]", "data.batch_size=7"]
    dm = InMemoryDataModule(cfg_for(tmp_path, *over).data, seed=0)
    dm.setup()
    s = dm.splits
    x, _ = next(iter(dm.val_dataloader()))
    by_hand = (s.x_val.float() / 255 - s.state["mean"]) / s.state["std"]
    assert x.dtype == torch.float32 and torch.equal(x, by_hand[: len(x)])
    aug = InMemoryDataModule(cfg_for(tmp_path, *over, "data.augment=true").data, seed=0)
    aug.setup()
    xa, _ = next(iter(aug.train_dataloader()))
    plain, _ = next(iter(dm.train_dataloader()))
    assert xa.shape == plain.shape and not torch.equal(xa, plain)


def test_augment_on_non_image_data_is_an_error(tmp_path: Path) -> None:
    dm = InMemoryDataModule(csv_cfg(tmp_path, write_csv(tmp_path / "d.csv"), "data.augment=true").data, seed=0)
    dm.setup()
    with pytest.raises(UserError, match=r"data.augment: .* need images .*samples of shape \(3,\)"):
        dm.train_dataloader()


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_folder(root, {"a": 2, "b": 2})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = cfg_for(tmp_path, "data.name=folder", f"data.path={root}", "data.image_size=[12, 10]")
    with pytest.raises(UserError, match=r"b/broken\.png: not a readable image"):
        load_splits(cfg.data, 0)


def test_memory_estimate_refuses_before_decoding(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "imgs"
    write_folder(root, {"a": 2, "b": 2})
    monkeypatch.setattr(memory, "available_bytes", lambda device: 100 << 20)
    decoded = []
    monkeypatch.setattr("deepnets.userdata.decode_images", lambda *a, **k: decoded.append(1))
    cfg = cfg_for(tmp_path, "data.name=folder", f"data.path={root}", "data.image_size=[4000, 4000]")
    need = (4 * 3 * 4000 * 4000 * 1.1 + (512 << 20)) / (1 << 30)  # uint8 images + 10% + 512 MiB headroom
    with pytest.raises(UserError, match=rf"4 images of 3x4000x4000 need ~{need:.3g} GiB .* 0\.0977 GiB available"):
        load_splits(cfg.data, 0)
    assert not decoded


# ---------------------------------------------------------------- through train, resume, metrics


def test_csv_train_resume_and_metrics_by_hand(tmp_path: Path) -> None:
    """Train on a CSV with string labels; test metrics against the model applied by hand to the test split
    (eval batches of 7 over 17 test samples: an uneven last batch); resume; a changed file is refused."""
    path = write_csv(tmp_path / "d.csv", n=83)
    cfg = csv_cfg(tmp_path, path, "data.eval_batch_size=7", "data.batch_size=16", "trainer.max_epochs=1")
    first = train(cfg)
    assert first.status == "completed"
    run = first.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = load_checkpoint(run / metrics["best_checkpoint"])
    state = ckpt["InMemoryDataModule"]
    assert state["classes"] == ["ant", "moose", "zebra"] and state["features"] == ["a", "b", "c"]

    # independent computation: the split by its seed, statistics with numpy, the model by hand
    with open(path) as f:
        rows = list(csv.DictReader(f))
    x_all = np.array([[float(r[c]) for c in "abc"] for r in rows], dtype=np.float32)
    y_all = np.array([["ant", "moose", "zebra"].index(r["kind"]) for r in rows])
    g = torch.Generator().manual_seed(cfg.data.split_seed)
    perm = torch.randperm(83, generator=g)
    k = round(83 * cfg.data.test_fraction)
    test_idx, rest = perm[:k].numpy(), perm[k:].numpy()
    perm2 = torch.randperm(len(rest), generator=g)
    train_idx = rest[perm2[round(len(rest) * cfg.data.val_fraction) :].numpy()]
    mean, std = x_all[train_idx].mean(0), x_all[train_idx].std(0, ddof=1)
    assert np.allclose(state["mean"].numpy(), mean, atol=1e-6) and np.allclose(state["std"].numpy(), std, atol=1e-6)
    model = build_model(cfg.model, (3,), 3)
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    with torch.no_grad():
        logits = model(torch.from_numpy((x_all[test_idx] - mean) / std)).double()
    y = torch.from_numpy(y_all[test_idx])
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).double().mean())
    assert len(test_idx) == 17 and 17 % 7 != 0
    assert math.isclose(metrics["metrics"]["test/loss"], loss, rel_tol=1e-5)
    assert math.isclose(metrics["metrics"]["test/acc"], acc, rel_tol=1e-6)  # float32: 11/17 exactly as logged

    resumed = train(
        load_config(str(run / "config.yaml"), ["trainer.max_epochs=2"]), resume=str(run / "checkpoints" / "last.ckpt")
    )
    assert resumed.status == "completed" and json.loads((resumed.run_dir / "metrics.json").read_text())["epochs"] == 2
    write_csv(path, n=83, seed=5)  # the data changed: same columns and classes, other statistics
    with pytest.raises(UserError, match="the data differs from what the checkpoint was trained on: its mean"):
        train(
            load_config(str(run / "config.yaml"), ["trainer.max_epochs=3"]),
            resume=str(run / "checkpoints" / "last.ckpt"),
        )


def test_folder_and_npz_train(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_folder(root, {"a": 12, "b": 12})
    over = ["data.name=folder", f"data.path={root}", "data.image_size=[8, 8]", "data.augment=true", "name=f"]
    r = train(cfg_for(tmp_path, *over, "model.arch=resnet", "model.stage_depths=[1]", "model.width=4"))
    assert r.status == "completed" and 0 <= r.metrics["test/acc"] <= 1
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8), y=rng.integers(0, 3, 40))
    r = train(cfg_for(tmp_path, "data.name=npz", f"data.path={tmp_path / 'd.npz'}", "name=n", "data.whiten=zca"))
    assert r.status == "completed"
    state = load_checkpoint(r.run_dir / "checkpoints" / "last.ckpt")["InMemoryDataModule"]
    assert state["uint8"] and state["zca_W"].shape == (64, 64) and state["input_shape"] == [1, 8, 8]


def test_preprocess_matches_the_training_path_for_float_data(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv")
    s = load_splits(csv_cfg(tmp_path, path, "data.whiten=zca").data, 0)
    raw = load_splits(csv_cfg(tmp_path, path, "data.standardize=false").data, 0)
    assert torch.equal(preprocess(raw.x_test, s.state), s.x_test)


def test_lightning_stores_and_restores_the_datamodule_state() -> None:
    """We lean on Lightning keeping a datamodule's state_dict under its class's __qualname__."""
    import inspect

    from lightning.pytorch.trainer.connectors import checkpoint_connector

    src = inspect.getsource(checkpoint_connector)
    assert "datamodule.__class__.__qualname__" in src
    assert InMemoryDataModule.__qualname__ == "InMemoryDataModule"


def test_cifar10_folder_config_loads_and_runs_on_a_folder_of_its_layout(tmp_path: Path) -> None:
    """configs/cifar10_folder_resnet20.yaml (meant for a GPU on the real 60,000 JPEGs) on a tiny folder of the
    same layout (train/ + test/, 32x32 JPEGs): one fast_dev_run batch on the CPU."""
    cfg = load_config("cifar10_folder_resnet20.yaml")
    assert cfg.data.name == "folder" and cfg.data.image_size == [32, 32] and cfg.model.preset == "resnet20"
    root = tmp_path / "CIFAR10-JPEG"
    for split, n in (("train", 4), ("test", 2)):
        for c in ("airplane", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
                write_file(str(root / split / c / f"{i:04d}.jpg"), encode_jpeg(img))
    quick = [
        f"data.path={root}",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "trainer.progress_bar=false",
        "data.val_fraction=0.25",
        f"output_dir={tmp_path / 'runs'}",
    ]
    result = train(load_config("cifar10_folder_resnet20.yaml", quick))
    assert result.status == "completed" and 0 <= result.metrics["test/acc"] <= 1


def test_data_path_in_a_config_file_is_relative_to_that_file_and_recorded_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepnets.config import load_config, to_yaml

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "d.csv").write_text("a,b\n1,2\n")
    (folder / "c.yaml").write_text("task: regression\ndata: {name: csv, path: d.csv, target: b}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(folder / "c.yaml"))
    assert cfg.data.path == str(folder / "d.csv")
    override = load_config(str(folder / "c.yaml"), ["data.path=here.csv"])  # an override: the cwd
    assert override.data.path == str(elsewhere / "here.csv")
    assert f"path: {folder / 'd.csv'}" in to_yaml(cfg)  # a run's config.yaml reloads from any directory


def test_a_shipped_configs_data_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepnets.config import load_config

    monkeypatch.chdir(tmp_path)  # the shipped config lives in the package: its `data/...` means here
    assert load_config("cifar10_folder_resnet20").data.path == str(tmp_path / "data" / "CIFAR10-JPEG")
