"""`deepnets --predict RUN_DIR|EXPORT_DIR --input ...`: outputs against the model applied by hand, errors."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, encode_png

from deepnets.checkpoint import load_checkpoint
from deepnets.config import load_config
from deepnets.export import evaluate, export_run
from deepnets.models import build_model
from deepnets.predict import predict
from deepnets.run import train
from tests.conftest import run_cli
from tests.test_userdata import TINY_MODEL, write_csv, write_folder


class _Done:
    def __init__(self, returncode: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, out, err


def cli(capsys, *args: str) -> _Done:
    """`deepnets ARGS` in this process (the same main() as the console script; one test runs a real subprocess)."""
    from deepnets.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return _Done(code, out, err)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _model_and_state(run_dir: Path):
    cfg = load_config(str(run_dir / "config.yaml"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = load_checkpoint(run_dir / metrics["best_checkpoint"])
    state = ckpt["InMemoryDataModule"]
    model = build_model(cfg.model, tuple(state["input_shape"]), state["num_outputs"])
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    )
    return model.eval(), state, ckpt


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("csvrun")
    path = write_csv(tmp / "train.csv", n=90)
    cfg = load_config(
        None,
        [*TINY_MODEL, f"output_dir={tmp / 'runs'}", "data.name=csv", f"data.path={path}", "data.target=kind"],
    )
    result = train(cfg)
    assert result.status == "completed"
    return result.run_dir, tmp


def test_csv_predict_matches_the_model_by_hand_and_the_export(csv_run) -> None:
    run, tmp = csv_run
    new = write_csv(tmp / "new.csv", n=11, seed=9)
    no_target = tmp / "new_features_only.csv"  # a CSV may omit the target column, and reorder the rest
    with open(new) as f, open(no_target, "w", newline="") as g:
        rows = list(csv.DictReader(f))
        w = csv.writer(g)
        w.writerow(["c", "extra", "a", "b"])
        w.writerows([[r["c"], "ignored", r["a"], r["b"]] for r in rows])
    r = run_cli("--predict", str(run), "--input", str(no_target))
    assert r.returncode == 0, r.stderr
    out = _rows(r.stdout)
    assert list(out[0]) == ["id", "prediction", "p_ant", "p_moose", "p_zebra"]
    assert [o["id"] for o in out] == [str(i) for i in range(2, 13)]  # 1-based file lines of the samples

    model, state, _ = _model_and_state(run)
    x = torch.tensor([[float(r[c]) for c in "abc"] for r in rows])
    with torch.no_grad():
        probs = torch.softmax(model((x - state["mean"]) / state["std"]), dim=1)
    got = torch.tensor([[float(o[f"p_{c}"]) for c in ("ant", "moose", "zebra")] for o in out])
    assert torch.allclose(got, probs, atol=1e-6)
    assert [o["prediction"] for o in out] == [["ant", "moose", "zebra"][i] for i in probs.argmax(1).tolist()]

    export = export_run(run, tmp / "export")
    assert (export / "preprocess.safetensors").is_file()
    assert predict(export, no_target) == predict(run, no_target)
    assert predict(export, new) == predict(run, no_target)  # the target column, when present, is ignored


def test_evaluate_of_a_csv_export_is_the_runs_test_metrics(csv_run) -> None:
    run, tmp = csv_run
    export = export_run(run, tmp / "export_eval")
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    got = evaluate(export)
    assert math.isclose(got["test/acc"], metrics["test/acc"], rel_tol=1e-6)
    assert math.isclose(got["test/loss"], metrics["test/loss"], rel_tol=1e-5)


def test_output_file_is_written_once_and_never_overwritten(csv_run, capsys) -> None:
    run, tmp = csv_run
    out = tmp / "preds.csv"
    r = cli(capsys, "--predict", str(run), "--input", str(tmp / "train.csv"), "--output", str(out))
    assert r.returncode == 0 and r.stdout == "" and "predictions:" in r.stderr
    assert len(_rows(out.read_text())) == 90
    before = out.read_bytes()
    r = cli(capsys, "--predict", str(run), "--input", str(tmp / "train.csv"), "--output", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --output {out} exists; predict never overwrites a file (remove it or choose another)"
    ]
    assert out.read_bytes() == before
    assert not [p for p in tmp.iterdir() if p.name.startswith(".preds.csv.")]  # no temporary file left


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: t / "nope.csv", "--input {p} does not exist"),
        (
            lambda t: _write(t / "cols.csv", "a,b\n1,2\n"),
            "--input {p}: no column 'c'; the model was trained on columns a, b, c",
        ),
        (
            lambda t: _write(t / "bad.csv", "a,b,c\n1,x,3\n"),
            "{p}:2: non-numeric value 'x' in column 'b' (row 2 of the file)",
        ),
        (
            lambda t: _npz(t / "wide.npz", np.zeros((3, 4))),
            "--input {p}: samples of shape (4,), the model was trained on (3,) (3 features)",
        ),
        (lambda t: _write(t / "x.txt", "1"), "--input {p}: give a .csv file, an .npz file or a folder of images"),
    ],
)
def test_bad_inputs_are_one_line_exit_2_nothing_written(csv_run, capsys, make, message: str) -> None:
    run, tmp = csv_run
    p = make(tmp)
    out = tmp / f"never_{p.name}.csv"
    r = cli(capsys, "--predict", str(run), "--input", str(p), "--output", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {message.format(p=p)}"]
    assert not out.exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _npz(path: Path, x: np.ndarray) -> Path:
    np.savez(path, x=x)
    return path


def test_predict_usage_errors(capsys) -> None:
    r = cli(capsys, "--input", "x.csv")
    assert r.returncode == 2 and r.stderr.strip() == "error: --input / --output go with --predict RUN_DIR|EXPORT_DIR"
    r = cli(capsys, "--predict", "/nonexistent_run")
    assert r.returncode == 2 and r.stderr.strip() == "error: --predict needs --input FILE.csv|FILE.npz|FOLDER"


def test_folder_predict_resizes_and_matches_by_hand(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_folder(root / "train", {"cat": 8, "dog": 8}, size=(12, 12))
    write_folder(root / "test", {"cat": 2, "dog": 2}, size=(12, 12), seed=3)
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            f"output_dir={tmp_path / 'runs'}",
            "data.name=folder",
            f"data.path={root}",
            "data.image_size=[6, 6]",
            "data.val_fraction=0.25",
        ],
    )
    run = train(cfg).run_dir
    new = tmp_path / "new" / "sub"
    new.mkdir(parents=True)
    rng = np.random.default_rng(4)
    images = {}
    for name, c in (("one.png", 3), ("two.png", 1)):
        img = torch.from_numpy(rng.integers(0, 256, (c, 9, 7), dtype=np.uint8))
        (new / name).write_bytes(bytes(encode_png(img).numpy()))
        images[f"sub/{name}"] = img
    header, rows = predict(run, tmp_path / "new")
    assert header == ["id", "prediction", "p_cat", "p_dog"] and [r[0] for r in rows] == ["sub/one.png", "sub/two.png"]
    model, state, _ = _model_and_state(run)
    for row in rows:
        img = decode_image(str(new.parent / row[0]))  # by hand: decode, to RGB, resize, / 255, standardise
        img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
        small = torch.nn.functional.interpolate(img[None].float(), size=(6, 6), mode="bilinear", antialias=True)
        small = small.round().clamp(0, 255) / 255
        with torch.no_grad():
            p = torch.softmax(model((small - state["mean"]) / state["std"]), dim=1)[0]
        assert torch.allclose(torch.tensor([float(v) for v in row[2:]]), p, atol=1e-6), row[0]


def test_regression_predict_is_in_the_targets_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    y = np.stack([x @ [1.0, -2.0, 0.5, 0.0] * 30 + 150, x[:, 0] * 3 - 7], axis=1)
    path = tmp_path / "reg.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["f1", "f2", "f3", "f4", "price", "score"])
        w.writerows([[*map(float, a), *map(float, b)] for a, b in zip(x, y, strict=True)])
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            f"output_dir={tmp_path / 'runs'}",
            "task=regression",
            "data.name=csv",
            f"data.path={path}",
            "data.target=[price, score]",
        ],
    )
    run = train(cfg).run_dir
    header, rows = predict(run, path)
    assert header == ["id", "price", "score"] and len(rows) == 120
    model, state, ckpt = _model_and_state(run)
    mean, std = ckpt["state_dict"]["target_mean"], ckpt["state_dict"]["target_std"]
    xt = torch.tensor(x, dtype=torch.float32)
    with torch.no_grad():
        by_hand = model((xt - state["mean"]) / state["std"]) * std + mean
    assert torch.allclose(torch.tensor([[float(v) for v in r[1:]] for r in rows]), by_hand, atol=1e-4)
    got = evaluate(export_run(run))
    assert set(got) == {"test/loss", "test/mse", "test/mae", "test/r2"}
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    for key in sorted(got):
        assert math.isclose(got[key], metrics[key], rel_tol=1e-4, abs_tol=1e-5), key
