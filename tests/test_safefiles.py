"""Files a user brings (data, checkpoints, run directories) are data: no code runs, every fault is one line."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_model

import deepnets.memory as memory
from deepnets.checkpoint import check_resumable, load_checkpoint
from deepnets.config import load_config, to_yaml
from deepnets.data import InMemoryDataModule, TensorBatches, load_splits, read_cifar_batch
from deepnets.errors import UserError
from deepnets.export import evaluate, export_run
from deepnets.models import build_model
from deepnets.run import train
from tests.conftest import ROOT, TINY
from tests.test_data import cfg_for, write_cifar, write_idx, write_mnist

# ---------------------------------------------------------------- evil and valid CIFAR-10 batches


class _System:
    """Unpickling this runs a shell command (the classic `__reduce__` payload)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _NumpyRunstring:
    """A global of another module: numpy's own test helper that exec()s a string."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return (runstring, (self.code, {}))


def _evil_payloads(marker: Path) -> dict[str, object]:
    valid = {"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))}
    return {
        "os_system": _System(f"touch {marker}"),
        "numpy_runstring": _NumpyRunstring(f"open({str(marker)!r}, 'w').close()"),
        "valid_batch_plus_evil_entry": {**valid, "batch_label": _System(f"touch {marker}")},
        "evil_inside_the_labels": {**valid, "labels": [*range(9), _System(f"touch {marker}")]},
    }


@pytest.mark.parametrize(
    "kind", ["os_system", "numpy_runstring", "valid_batch_plus_evil_entry", "evil_inside_the_labels"]
)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_evil_cifar_batch_is_refused_and_never_runs(tmp_path: Path, kind: str, protocol: int) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps(_evil_payloads(marker)[kind], protocol=protocol))
    with pytest.raises(UserError) as err:
        load_splits(cfg_for(tmp_path, "cifar10"), seed=0)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: refused: the pickle calls ") and "\n" not in msg, msg
    assert not marker.exists()


def test_codecs_global_is_only_latin1_bytes(tmp_path: Path) -> None:
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); any other use of it is refused
    path = tmp_path / "batch"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x08\x00\x00\x00rot_13xx\x86R.")
    with pytest.raises(UserError, match=r"refused: the pickle calls _codecs.encode\(str, 'rot_13xx'\)"):
        read_cifar_batch(path)


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch byte for byte as CIFAR-10's Python 2 pickles are: protocol 2, str keys, numpy.core globals."""

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: Python 2's str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    n = len(data)
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b") + b"\x87R"
        # state: (1, shape, dtype, fortran, raw bytes)
        + b"(K\x01M" + struct.pack("<H", n) + b"M\x00\x0c\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89" + s(data.tobytes()) + b"tb"
    )  # fmt: skip
    items = s(b"batch_label") + s(b"training batch 1 of 5") + s(b"data") + array
    items += s(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    items += s(b"filenames") + b"](" + b"".join(s(f"img_{i}.png".encode()) for i in range(n)) + b"e"
    return b"\x80\x02}(" + items + b"u."


def test_valid_cifar_batches_load_with_shapes_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    expected: dict[str, tuple[np.ndarray, list[int]]] = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 7)]
        expected[name] = (data, labels)
        if i < 3:  # the real files' format, and what Python 3 writes with each protocol
            (base / name).write_bytes(_py2_batch(data, labels))
        else:
            (base / name).write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=[2, 4, 5][i - 3]))
    # the Python 2 bytes are what pickle itself reads as the batch (so the hand-made format is right)
    ref = pickle.loads((base / "data_batch_1").read_bytes(), encoding="latin1")
    assert np.array_equal(ref["data"], expected["data_batch_1"][0]) and ref["labels"] == expected["data_batch_1"][1]
    for name, (data, labels) in expected.items():
        x, y = read_cifar_batch(base / name)
        assert x.shape == (7, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(data).view(7, 3, 32, 32)) and y.tolist() == labels
    s = load_splits(cfg_for(tmp_path, "cifar10", "data.val_fraction=0", "checkpoint.enabled=false"), seed=0)
    assert s.x_train.shape == (35, 3, 32, 32) and s.x_test.shape == (7, 3, 32, 32)
    assert s.y_test.tolist() == expected["test_batch"][1]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ([1, 2, 3], "not a CIFAR-10 batch (a pickled list, not a dict)"),
        ({"labels": [0]}, "'data' is NoneType"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "'data' is float32 array of shape (2, 3072)"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "2 images but 1 labels"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "label 10 at index 1 is outside 0..9"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "'labels' is not a list of integers"),
    ],
)
def test_cifar_batch_of_the_wrong_content_is_named(tmp_path: Path, entry: object, message: str) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError) as err:
        read_cifar_batch(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_evaluate_of_an_export_pointing_at_evil_cifar_runs_nothing(tmp_path: Path) -> None:
    write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    bad = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps(_System(f"touch {marker}")))
    export = tmp_path / "export"
    export.mkdir()
    cfg = load_config(None, [*TINY, "data.name=cifar10", f"data.root={tmp_path / 'data'}"])
    (export / "config.yaml").write_text(to_yaml(cfg))
    save_model(build_model(cfg.model, (3, 32, 32), 10), str(export / "model.safetensors"))
    with pytest.raises(UserError, match=f"{bad}: refused"):
        evaluate(export)
    assert not marker.exists()


# ---------------------------------------------------------------- MNIST-format IDX files


def _raw(root: Path) -> Path:
    return root / "MNIST" / "raw"


@pytest.mark.parametrize(
    ("damage", "culprit", "message"),
    [
        ("label_200", "train-labels-idx1-ubyte", "label 200 at index 7 is outside 0..9"),
        ("int16_images", "train-images-idx3-ubyte", "IDX type code 0x0B (short); MNIST-format files hold unsigned"),
        ("float_labels", "t10k-labels-idx1-ubyte", "IDX type code 0x0D (float)"),
        ("images_20x20", "train-images-idx3-ubyte", "images are 20x20, MNIST-format images are 28x28"),
        ("count_mismatch", "train-images-idx3-ubyte", "holds 60 images but"),
        ("labels_2d", "train-labels-idx1-ubyte", "an IDX file of 2 dimensions, expected 1"),
        ("extra_bytes", "t10k-images-idx3-ubyte", "corrupt or truncated: the header says 20x28x28 = 15680 bytes"),
        ("not_idx", "t10k-images-idx3-ubyte", "corrupt or truncated: not an IDX file"),
    ],
)
def test_bad_idx_file_is_one_line_naming_it(tmp_path: Path, damage: str, culprit: str, message: str) -> None:
    write_mnist(tmp_path)
    raw = _raw(tmp_path)
    labels = np.arange(60) % 10
    if damage == "label_200":
        labels[7] = 200
        write_idx(raw / "train-labels-idx1-ubyte", labels)
    elif damage in ("int16_images", "float_labels"):
        f = raw / ("train-images-idx3-ubyte" if damage == "int16_images" else "t10k-labels-idx1-ubyte")
        b = bytearray(f.read_bytes())
        b[2] = 0x0B if damage == "int16_images" else 0x0D
        f.write_bytes(bytes(b))
    elif damage == "images_20x20":
        write_idx(raw / "train-images-idx3-ubyte", np.zeros((60, 20, 20)))
    elif damage == "count_mismatch":
        write_idx(raw / "train-labels-idx1-ubyte", labels[:59])
    elif damage == "labels_2d":
        write_idx(raw / "train-labels-idx1-ubyte", labels.reshape(6, 10))
    elif damage == "extra_bytes":
        f = raw / "t10k-images-idx3-ubyte"
        f.write_bytes(f.read_bytes() + b"\0")
    elif damage == "not_idx":
        (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x1f\x8b gzip, not unpacked")
    with pytest.raises(UserError) as err:
        load_splits(cfg_for(tmp_path, "mnist"), seed=0)
    msg = str(err.value)
    assert msg.startswith(f"{raw / culprit}") and message in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- checkpoints


def test_random_bytes_are_called_corrupt_not_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "random.ckpt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {path} is corrupt or not a torch checkpoint (") and "unsafe" not in msg


@pytest.mark.parametrize("payload", ["system", "getattr"])
def test_malicious_checkpoint_refusal_gives_no_allow_list_advice(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"

    class GetattrPayload:
        def __reduce__(self):
            return (getattr, ("text", "upper"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _System(f"touch {marker}") if payload == "system" else GetattrPayload()}, evil)
    with pytest.raises(UserError) as err:
        load_checkpoint(evil)
    msg = str(err.value)
    name = "posix.system" if payload == "system" else "getattr"  # torch spells builtins bare
    assert msg == f"checkpoint {evil} refused: its pickle calls {name}, which is code, not weights (nothing was run)"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        ({"epoch": 3, "weights": [1, 2]}, "no state_dict / pytorch-lightning_version; its keys: epoch, weights"),
        ({"w": torch.zeros(2), "b": torch.zeros(1)}, "a bare state_dict of 2 tensors, not a Lightning checkpoint"),
        ({"state_dict": [1]}, "no state_dict / pytorch-lightning_version; its keys: state_dict"),
    ],
)
def test_dict_that_is_not_a_lightning_checkpoint(tmp_path: Path, obj: dict, why: str) -> None:
    path = tmp_path / "x.ckpt"
    torch.save(obj, path)
    with pytest.raises(UserError, match=rf"^checkpoint {path} is not a deepnets checkpoint \({why}"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One finished tiny run (3 classes, inputs of 8), shared by the checkpoint and export tests."""
    tmp = tmp_path_factory.mktemp("trained")
    return train(load_config(None, [*TINY, f"output_dir={tmp / 'runs'}"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.num_classes=5", "its head.weight has shape [3, 16], this model's [5, 16]"),
        ("data.input_shape=[10]", "its layers.0.0.weight has shape [16, 8], this model's [16, 10]"),
    ],
)
def test_resume_on_other_data_names_the_first_mismatching_tensor(trained, tmp_path: Path, override, message) -> None:
    last = trained.run_dir / "checkpoints" / "last.ckpt"
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path / 'runs'}", override])
    with pytest.raises(UserError) as err:
        train(cfg, resume=str(last))
    assert str(err.value) == (
        f"--resume {last}: the checkpoint does not fit this run's model: {message} "
        "(trained on other data or another model?)"
    )
    assert not (tmp_path / "runs").exists()  # refused before any run directory


def test_weights_only_checkpoint_is_not_resumable(trained, tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained.run_dir / "checkpoints" / "last.ckpt")
    slim = {k: v for k, v in ckpt.items() if k not in ("optimizer_states", "lr_schedulers")}
    from deepnets.memory import meta_model_for

    cfg = load_config(None, TINY)
    check_resumable(ckpt, meta_model_for(cfg), "last.ckpt")  # the full one is fine
    with pytest.raises(UserError, match=r"holds weights only \(no optimizer_states\); it cannot be resumed"):
        check_resumable(slim, meta_model_for(cfg), "slim.ckpt")


# ---------------------------------------------------------------- export


def _copy_run(trained, tmp_path: Path) -> Path:
    run = tmp_path / "moved_run"
    shutil.copytree(trained.run_dir, run)
    shutil.rmtree(run / "export", ignore_errors=True)
    return run


def _exported_from(run: Path) -> str:
    with safe_open(str(run / "export" / "model.safetensors"), "pt") as f:
        return f.metadata()["checkpoint"]


def test_export_resolves_best_checkpoint_relative_absolute_and_moved(trained, tmp_path: Path) -> None:
    best = Path(json.loads((trained.run_dir / "metrics.json").read_text())["best_checkpoint"])
    assert best.name.startswith("best-")
    run = _copy_run(trained, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    # an old absolute path into the run's former place: found under checkpoints/ here
    metrics["best_checkpoint"] = str(tmp_path / "elsewhere" / "checkpoints" / best.name)
    (run / "metrics.json").write_text(json.dumps(metrics))
    export_run(run)
    assert _exported_from(run) == str(run / "checkpoints" / best.name)
    # relative to the run directory, as metrics.json writes it now
    metrics["best_checkpoint"] = f"checkpoints/{best.name}"
    (run / "metrics.json").write_text(json.dumps(metrics))
    export_run(run)
    assert _exported_from(run) == str(run / "checkpoints" / best.name)


def test_export_never_silently_takes_last_for_a_missing_best(trained, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    name = Path(metrics["best_checkpoint"]).name
    (run / "checkpoints" / name).unlink()
    for best in (f"checkpoints/{name}", str(tmp_path / "gone" / "checkpoints" / name)):
        metrics["best_checkpoint"] = best
        (run / "metrics.json").write_text(json.dumps(metrics))
        with pytest.raises(UserError, match=rf"names the best checkpoint {best}, which does not exist .* refusing"):
            export_run(run)
        assert not (run / "export").exists()


@pytest.mark.parametrize(("content", "message"), [("{not json", "is corrupt ("), ("[1, 2]", "top level is list")])
def test_export_with_a_bad_metrics_json_is_one_line(trained, tmp_path: Path, content: str, message: str) -> None:
    run = _copy_run(trained, tmp_path)
    (run / "metrics.json").write_text(content)
    with pytest.raises(UserError) as err:
        export_run(run)
    assert str(err.value).startswith(f"{run / 'metrics.json'} ") and message in str(err.value)
    assert not (run / "export").exists()


def test_export_without_metrics_json_warns_and_takes_last(trained, tmp_path: Path, capsys) -> None:
    run = _copy_run(trained, tmp_path)
    (run / "metrics.json").unlink()
    export_run(run)
    assert _exported_from(run) == str(run / "checkpoints" / "last.ckpt")
    assert capsys.readouterr().err == f"warning: {run} has no metrics.json (the run did not finish): exporting " + (
        f"{run / 'checkpoints' / 'last.ckpt'}\n"
    )


def test_exports_are_world_readable_whatever_the_umask(trained, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    old = os.umask(0o077)
    try:
        out = export_run(run)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "model.safetensors": 0o644,
        "config.yaml": 0o644,
        "preprocess.safetensors": 0o644,
    }


def test_export_of_a_checkpoint_that_does_not_fit_the_config_is_one_line(trained, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("width: 16", "width: 12"))
    with pytest.raises(UserError, match=r"does not fit the model of .*config.yaml: its layers.0.0.weight has shape"):
        export_run(run)


# ---------------------------------------------------------------- tuning


def test_lr_find_writes_nothing_into_the_working_directory(tiny, tmp_path: Path, monkeypatch) -> None:
    # Lightning writes its scratch checkpoint to the trainer's root, by default the working directory; a deleted
    # working directory is unwritable even for root (a read-only mode bit is not), which the tests may run as.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cwd.rmdir()
    from deepnets import tune

    cfg = tiny("optim.lr=0.123")
    lr = tune.lr_find(cfg, build_model(cfg.model, (8,), 3), run_dir=None)
    assert lr != 0.123 and 1e-6 <= lr <= 1.0


def test_lr_probe_never_keeps_a_diverging_rate(tiny, monkeypatch, capsys) -> None:
    from deepnets import tune

    cfg = tiny("trainer.lr_probe=[1e-4, 50.0, 1e4]", "trainer.lr_probe_steps=20")
    model = build_model(cfg.model, (8,), 3)
    # a rate whose loss ends above the untrained model's diverged, however low it is among the others:
    # shift every trained loss up so only the smallest step size stays below its start
    real = tune._subset_loss
    calls = iter(range(100))
    monkeypatch.setattr(tune, "_subset_loss", lambda m, d: real(m, d) + (0.0 if next(calls) < 2 else 100.0))
    best, results = tune.lr_probe(cfg, model, run_dir=None)
    assert best == 1e-4 and [lr for lr, _ in results] == [1e-4, 50.0, 1e4]
    assert "diverged" in capsys.readouterr().out
    monkeypatch.setattr(tune, "_subset_loss", real)
    with pytest.raises(UserError, match=r"^trainer.lr_probe: every rate diverged \(training loss from "):
        tune.lr_probe(tiny("trainer.lr_probe=[1e4, 1e6]", "trainer.lr_probe_steps=20"), model, run_dir=None)


# ---------------------------------------------------------------- memory


def test_parameter_and_activation_estimate_match_a_hand_count(tiny) -> None:
    cfg = tiny("model.depth=3", "model.width=16", "data.batch_size=32")
    n_params, activations = memory.estimate(cfg, (8,), 3)
    real = build_model(cfg.model, (8,), 3)
    assert n_params == sum(p.numel() for p in real.parameters())
    # Linear-ReLU x3 + head: autograd keeps the input (B, 8) and each ReLU's output (B, 16), which the next
    # Linear reads (the same tensor); weights are parameters, counted apart. float32.
    assert activations == 4 * (32 * 8 + 3 * 32 * 16)
    bn = memory.estimate(
        tiny("model.depth=3", "model.width=16", "data.batch_size=32", "model.batch_norm=true"), (8,), 3
    )
    assert bn[1] > activations  # BatchNorm keeps its input and statistics too


@pytest.mark.parametrize("arch", ["mlp", "resmlp", "skipnet"])
def test_depth_extrapolation_is_exact(tiny, monkeypatch, arch: str) -> None:
    cfg = tiny(f"model.arch={arch}", "model.depth=40", "model.width=8", "model.batch_norm=true")
    monkeypatch.setattr(memory, "EXTRAPOLATE_ABOVE", 10**9)
    exact = memory.estimate(cfg, (8,), 3)
    monkeypatch.setattr(memory, "EXTRAPOLATE_ABOVE", 4)
    assert memory.estimate(cfg, (8,), 3) == exact


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.width=100000000", "model.width=100000000"), ("model.depth=100000", "model.depth=100000")],
)
def test_a_model_that_cannot_fit_fails_fast_with_the_estimate(tiny, override: str, key: str) -> None:
    cfg = tiny(override, "model.width=4096" if "depth" in override else "model.depth=2")
    rng = torch.get_rng_state()
    t = time.perf_counter()
    with pytest.raises(UserError) as err:
        memory.check_fits(cfg)
    assert time.perf_counter() - t < 10  # seconds under any load; milliseconds on a quiet machine
    msg = str(err.value)
    assert msg.startswith("model: ~") and "GiB of parameters and activations at data.batch_size=32, " in msg
    assert " GiB available (" in msg and key in msg
    assert torch.equal(torch.get_rng_state(), rng)  # the meta build drew nothing from the seeded generator


def test_memory_check_is_cheap_for_every_shipped_config() -> None:
    memory.check_fits(load_config("mlp", []))  # warm up torch's meta kernels
    slowest = 0.0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(str(path), ["trainer.accelerator=cpu"])
        t = time.perf_counter()
        memory.check_fits(cfg)
        slowest = max(slowest, time.perf_counter() - t)
    assert slowest < 1.5  # ~0.05-0.3 s each on this shared 2-core box


def test_available_memory_is_read_from_meminfo() -> None:
    free = memory.available_bytes(torch.device("cpu"))
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert free is not None and 0 < free <= total


# ---------------------------------------------------------------- a last batch of one sample with BatchNorm


def test_loader_drop_last_leaves_out_the_short_batch() -> None:
    x = torch.arange(65).float()
    assert len(TensorBatches(x, x.long(), 32, shuffle=True)) == 3
    dropped = TensorBatches(x, x.long(), 32, shuffle=True, drop_last=True)
    batches = [xb for xb, _ in dropped]
    assert len(dropped) == 2 and [len(b) for b in batches] == [32, 32]


@pytest.mark.parametrize("batch_norm", [True, False])
def test_one_sample_last_batch_is_dropped_only_with_batch_norm(tiny, capsys, batch_norm: bool) -> None:
    cfg = tiny("data.train_size=65", f"model.batch_norm={str(batch_norm).lower()}", "trainer.max_epochs=2")
    result = train(cfg)
    assert result.status == "completed"
    steps = json.loads((result.run_dir / "metrics.json").read_text())["steps"]
    err = capsys.readouterr().err
    note = "note: data.batch_size=32 leaves a last training batch of 1 sample (65 samples); BatchNorm cannot train"
    if batch_norm:
        assert steps == 2 * 2 and err.count(note) == 1  # said once, not once per epoch
    else:
        assert steps == 2 * 3 and note not in err


def test_datamodule_without_trainer_keeps_every_batch() -> None:
    dm = InMemoryDataModule(load_config(None, ["data.train_size=257", "data.batch_size=128"]).data, seed=0)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 3


# ---------------------------------------------------------------- one case per family, through the command line


def _run_dir_made_before_data() -> bool:
    """Whether train() still creates the run directory (with config.yaml) before it reads the data files.

    The faults engineer moves it after data and model are known to be good; until then a bad data file
    leaves that one config.yaml behind (and nothing else), after it nothing at all.
    """
    import inspect

    import deepnets.run

    src = inspect.getsource(deepnets.run.train)
    made, read = src.find("make_run_dir("), src.find("data.setup(")
    return -1 not in (made, read) and made < read


def _case_evil_cifar(inp: Path) -> list[str]:
    write_cifar(inp)
    (inp / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(_System(f"touch {inp.parent / 'pwned'}")))
    return ["data.name=cifar10", f"data.root={inp}"]


def _case_idx(damage: str):
    def make(inp: Path) -> list[str]:
        write_mnist(inp)
        raw = _raw(inp)
        if damage == "label":
            write_idx(raw / "train-labels-idx1-ubyte", np.r_[np.arange(59) % 10, 200])
        elif damage == "type":
            f = raw / "train-images-idx3-ubyte"
            f.write_bytes(f.read_bytes()[:2] + b"\x0c" + f.read_bytes()[3:])
        else:
            write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((20, 32, 32)))
        return ["data.name=mnist", f"data.root={inp}"]

    return make


def _case_ckpt(kind: str):
    def make(inp: Path) -> list[str]:
        inp.mkdir(parents=True)
        path = inp / f"{kind}.ckpt"
        if kind == "random":
            path.write_bytes(os.urandom(3000))
        elif kind == "malicious":
            torch.save({"state_dict": {}, "x": _System(f"touch {inp.parent / 'pwned'}")}, path)
        else:
            torch.save({"model": {"w": [1, 2, 3]}, "epoch": 1}, path)
        return ["--resume", str(path)]

    return make


def _case_other_data(trained):
    def make(inp: Path) -> list[str]:
        inp.mkdir(parents=True)
        shutil.copy(trained.run_dir / "checkpoints" / "last.ckpt", inp / "last.ckpt")
        return ["data.num_classes=4", "--resume", str(inp / "last.ckpt")]

    return make


def _case_corrupt_metrics(trained):
    def make(inp: Path) -> list[str]:
        shutil.copytree(trained.run_dir, inp / "run", ignore=shutil.ignore_patterns("export"))
        (inp / "run" / "metrics.json").write_text('{"status": "completed", "best_checkpoint": ')
        return ["--export", str(inp / "run")]

    return make


# (id, inputs, expected stderr fragment, in a subprocess, data read after the run directory is made)
CASES = [
    ("evil_cifar", _case_evil_cifar, "data_batch_1: refused: the pickle calls posix.system", True, True),
    ("idx_label_200", _case_idx("label"), "train-labels-idx1-ubyte: label 200 at index 59", False, True),
    ("idx_type_int", _case_idx("type"), "train-images-idx3-ubyte: IDX type code 0x0C (int)", False, True),
    ("idx_32x32", _case_idx("size"), "t10k-images-idx3-ubyte: images are 32x32", False, True),
    ("random_bytes_ckpt", _case_ckpt("random"), "random.ckpt is corrupt or not a torch checkpoint", False, False),
    ("malicious_ckpt", _case_ckpt("malicious"), "malicious.ckpt refused: its pickle calls posix.system", True, False),
    ("non_lightning_dict", _case_ckpt("dict"), "dict.ckpt is not a deepnets checkpoint (no state_dict", False, False),
    ("other_data_resume", "other_data", "its head.weight has shape [3, 16], this model's [4, 16]", True, False),
    ("corrupt_metrics_export", "corrupt_metrics", "metrics.json is corrupt (", False, False),
    ("huge_width", ["model.width=100000000"], "GiB available (model.width=100000000, model.depth=2", False, False),
    ("huge_depth", ["model.depth=100000", "model.width=4096"], "model.depth=100000; ", False, False),
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("case", "make", "expected", "subprocess", "late"), CASES, ids=[c[0] for c in CASES])
def test_each_family_is_one_error_line(trained, tmp_path: Path, capsys, case, make, expected, subprocess, late) -> None:
    from deepnets.cli import main
    from tests.conftest import run_cli

    inp = tmp_path / "in"
    if isinstance(make, list):  # overrides only
        extra = make
    elif isinstance(make, str):  # cases built from the shared trained run
        extra = {"other_data": _case_other_data, "corrupt_metrics": _case_corrupt_metrics}[make](trained)(inp)
    else:
        extra = make(inp)
    (tmp_path / "tiny.yaml").write_text(to_yaml(load_config(None, TINY)))
    before = _files(tmp_path)
    argv = (
        extra
        if extra[0] == "--export"
        else ["--config", str(tmp_path / "tiny.yaml"), f"output_dir={tmp_path / 'runs'}"]
    )
    argv += [] if extra[0] == "--export" else extra
    if subprocess:
        r = run_cli(*argv, cwd=tmp_path)
        rc, err = r.returncode, r.stderr
    else:
        rc = main(argv)
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert len([x for x in lines if x.startswith("error:")]) == 1 and lines[-1].startswith("error: "), err
    assert expected in lines[-1], lines[-1]
    assert not (tmp_path / "pwned").exists()
    written = _files(tmp_path) - before
    allowed = {"runs/tiny/version_0/config.yaml"} if late and _run_dir_made_before_data() else set()
    assert written <= allowed, written


def test_batch_of_one_with_batch_norm_trains_and_says_so(tmp_path: Path, capsys) -> None:
    from deepnets.cli import main

    # digits: 1797 samples -> 1438 for training and validation -> 1294 to train on = 3 x 431 + 1
    rc = main(
        ["--config", "mlp", "data.batch_size=431", "trainer.max_epochs=1", "trainer.progress_bar=false",
         "logging.grad_norm_every_n_steps=0", f"output_dir={tmp_path / 'runs'}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    notes = [x for x in err.splitlines() if x.startswith("note: data.batch_size=431")]
    assert notes == [
        "note: data.batch_size=431 leaves a last training batch of 1 sample (1294 samples); BatchNorm cannot "
        "train on it, so every epoch leaves it out"
    ]
    assert not [x for x in err.splitlines() if x.startswith("error:")]
    (run,) = (tmp_path / "runs" / "mlp").iterdir()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3


def test_download_goes_through_torchvision_with_its_md5_then_reads_as_data(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils
    from torchvision.datasets import CIFAR10

    calls: list[tuple] = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        calls.append((url, download_root, filename, md5))
        write_cifar(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    s = load_splits(cfg_for(tmp_path, "cifar10", "data.download=true"), seed=0)
    assert calls == [(CIFAR10.url, str(tmp_path), CIFAR10.filename, CIFAR10.tgz_md5)]  # once: the test split is there
    assert s.x_test.shape == (10, 3, 32, 32)

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=rf"^downloading cifar10 into data.root={tmp_path / 'x'} failed: <urlopen"):
        load_splits(cfg_for(tmp_path / "x", "cifar10", "data.download=true"), seed=0)


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_are_never_called_truncated(tmp_path: Path, seed: int) -> None:
    # random bytes reach the unpickler's own errors (IndexError, ...) as well as UnpicklingError
    from deepnets.checkpoint import load_checkpoint

    path = tmp_path / "random.ckpt"
    path.write_bytes(random.Random(seed).randbytes(3000))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert f"checkpoint {path} is corrupt or not a torch checkpoint (" in str(e.value), str(e.value)
