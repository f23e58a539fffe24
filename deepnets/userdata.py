"""Readers for the user's own data files: a CSV table, an .npz of arrays, an image folder.

Each reader returns a `Source`: the samples as tensors, as they were in the file (float32 features,
uint8 images), plus what predict needs to read new inputs the same way (feature and target column
names, the class names). Nothing here standardises or splits: `deepnets.data` does that for every
dataset alike. Every problem with a file is one `UserError` naming the file and the place in it.

Rules a user can rely on:
- CSV: the first row is the header; every other row one sample. Feature values must be finite
  numbers; a missing or non-numeric one is an error naming its file line (1-based) and column.
- Class labels (CSV column, npz array, folder names) are mapped to ids 0..K-1 in sorted order:
  numerically when every label is an integer (so 2 < 10), else as strings. The sorted names are
  `classes`, saved with the run and used by predict.
- NPZ: read with `numpy.load(allow_pickle=False)`: an object array is refused, never unpickled.
  uint8 inputs are taken as images (scaled to [0, 1] per batch, like a folder's).
- Folder: every image is decoded as RGB (grey is replicated, an alpha channel dropped, as
  torchvision's ImageFolder does through PIL's convert("RGB")) and resized to `image_size` with
  antialiased bilinear interpolation; kept as uint8 (N, 3, H, W).
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deepnets.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CHANNELS = 3  # every folder image is decoded as RGB (see the module docstring)
DECODE_CHUNK = 512  # files per batched decode_jpeg call (and per read: the encoded bytes held at once)


@dataclass
class Source:
    """A dataset as read from its files: inputs (N, ...) float32 or uint8, targets (N,) int64 or
    float32 (N,) / (N, k); the val and test splits where the files give them."""

    x: Tensor
    y: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    classes: list[str] | None = None  # classification: the name of each class id
    features: list[str] | None = None  # csv: the feature columns, in input order
    targets: list[str] | None = None  # csv: the target columns (regression outputs are named after them)


# ---------------------------------------------------------------- labels


def encode_labels(values: Sequence[str], where: str) -> tuple[Tensor, list[str]]:
    """Class ids (N,) int64 and the sorted class names for string labels (numeric order if all are ints)."""
    unique = sorted(set(values))
    if all(_is_int(v) for v in unique):
        as_int = sorted({int(v) for v in unique})
        classes = [str(v) for v in as_int]
        index = {v: i for i, v in enumerate(as_int)}
        ids = [index[int(v)] for v in values]
    else:
        classes = unique
        index = {v: i for i, v in enumerate(classes)}
        ids = [index[v] for v in values]
    if len(classes) < 2:
        raise UserError(f"{where}: only one class ({classes[0] if classes else 'none'}); classification needs two")
    return torch.tensor(ids, dtype=torch.int64), classes


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def apply_classes(values: Sequence[str], classes: list[str], where: str) -> Tensor:
    """Ids of `values` under an existing mapping (a test split's labels); an unknown label is an error."""
    numeric = all(_is_int(c) for c in classes)
    index = {(int(c) if numeric else c): i for i, c in enumerate(classes)}
    out = []
    for i, v in enumerate(values):
        key = int(v) if numeric and _is_int(v) else v
        if key not in index:
            raise UserError(f"{where}: label {v!r} at index {i} is not one of the training classes {classes}")
        out.append(index[key])
    return torch.tensor(out, dtype=torch.int64)


# ---------------------------------------------------------------- CSV


def read_csv_table(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows (as strings) and each row's 1-based file line, with the stdlib csv module."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path}: empty file; a CSV needs a header row")
            header = [h.strip() for h in header]
            rows, lines = [], []
            start = reader.line_num + 1
            for row in reader:
                if row:  # blank lines are no samples
                    rows.append(row)
                    lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not a CSV row ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    dup = next((h for h in header if header.count(h) > 1), None)
    if dup is not None:
        raise UserError(f"{path}: the header names column {dup!r} twice")
    for row, line in zip(rows, lines, strict=True):
        if len(row) != len(header):
            raise UserError(f"{path}:{line}: {len(row)} values, the header has {len(header)} columns")
    return header, rows, lines


def _column_index(header: list[str], names: Sequence[str], path: Path, key: str) -> list[int]:
    missing = [n for n in names if n not in header]
    if missing:
        raise UserError(f"{key}: {path} has no column {missing[0]!r} (its columns: {', '.join(header)})")
    return [header.index(n) for n in names]


def numeric_columns(
    rows: list[list[str]], lines: list[int], header: list[str], cols: list[int], path: Path
) -> np.ndarray:
    """The values of columns `cols` as float32 (N, len(cols)); a missing or non-numeric value is one error."""
    out = np.empty((len(rows), len(cols)), dtype=np.float32)
    for r, row in enumerate(rows):
        for j, c in enumerate(cols):
            text = row[c].strip()
            try:
                v = float(text)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                what = "missing value" if not text else f"non-numeric value {text!r}"
                raise UserError(f"{path}:{lines[r]}: {what} in column {header[c]!r} (row {lines[r]} of the file)")
            out[r, j] = v
    return out


def csv_feature_names(header: list[str], target: str | list[str], features: list[str] | None) -> list[str]:
    targets = [target] if isinstance(target, str) else list(target)
    return list(features) if features is not None else [h for h in header if h not in targets]


def read_csv(path: str, target: str | list[str], features: list[str] | None, task: str) -> Source:
    """A CSV with a header row: the feature columns as float32 (N, D), the target column(s) as labels or floats."""
    p = Path(path)
    header, rows, lines = read_csv_table(p)
    targets = [target] if isinstance(target, str) else list(target)
    t_idx = _column_index(header, targets, p, "data.target")
    names = csv_feature_names(header, target, features)
    if not names:
        raise UserError(f"data.features: {p} has no column besides the target {targets}")
    f_idx = _column_index(header, names, p, "data.features")
    if not rows:
        raise UserError(f"{p}: no rows below the header")
    x = torch.from_numpy(numeric_columns(rows, lines, header, f_idx, p))  # (N, D)
    if task == "regression":
        y = torch.from_numpy(numeric_columns(rows, lines, header, t_idx, p))  # (N, k)
        y = y[:, 0].contiguous() if isinstance(target, str) else y
        return Source(x, y, features=names, targets=targets)
    labels = []
    for row, line in zip(rows, lines, strict=True):
        v = row[t_idx[0]].strip()
        if not v:
            raise UserError(f"{p}:{line}: missing value in column {targets[0]!r} (row {line} of the file)")
        labels.append(v)
    y, classes = encode_labels(labels, f"{p}: column {targets[0]!r}")
    return Source(x, y, classes=classes, features=names, targets=targets)


def read_csv_inputs(path: str, features: list[str]) -> tuple[Tensor, list[str]]:
    """Predict's reader: the training run's feature columns of a CSV (any other columns, such as the
    target, are ignored) as float32 (N, D), with each row's id (its 1-based file line)."""
    p = Path(path)
    header, rows, lines = read_csv_table(p)
    missing = [n for n in features if n not in header]
    if missing:
        raise UserError(
            f"--input {p}: no column {missing[0]!r}; the model was trained on columns {', '.join(features)}"
        )
    if not rows:
        raise UserError(f"--input {p}: no rows below the header")
    idx = [header.index(n) for n in features]
    return torch.from_numpy(numeric_columns(rows, lines, header, idx, p)), [str(n) for n in lines]


def csv_spec(path: str, target: str | list[str], features: list[str] | None) -> int:
    """The number of feature columns, from the header alone."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        header = []
    return len(csv_feature_names(header, target, features))


# ---------------------------------------------------------------- NPZ


def npz_array(npz: np.lib.npyio.NpzFile, key: str, path: Path, config_key: str) -> np.ndarray:
    if key not in npz.files:
        raise UserError(f"{config_key}: {path} has no array {key!r} (its arrays: {', '.join(npz.files) or 'none'})")
    try:
        a = npz[key]
    except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise UserError(f"{path}: array {key!r} is an object array (a pickle): refused, nothing run ({e})") from None
    except Exception as e:  # a damaged member
        raise UserError(f"{path}: array {key!r} is corrupt: {str(e).splitlines()[0]}") from None
    return a


def npz_inputs(a: np.ndarray, path: Path, key: str) -> Tensor:
    """Inputs (N, ...) as float32, or uint8 kept for images; anything else numeric-finite or an error."""
    if a.ndim < 2:
        raise UserError(f"{path}: array {key!r} has shape {a.shape}; inputs need (N, ...) with a sample dimension")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise UserError(f"{path}: array {key!r} is {a.dtype}; inputs must be real numbers")
    x = a.astype(np.float32)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        raise UserError(f"{path}: array {key!r} holds {x[tuple(bad[0])]} at index {tuple(int(i) for i in bad[0])}")
    return torch.from_numpy(x)


def _label_strings(a: np.ndarray, path: Path, key: str) -> list[str]:
    if a.ndim != 1:
        raise UserError(f"{path}: array {key!r} has shape {a.shape}; class labels need (N,)")
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        return [str(int(v)) for v in a]
    if a.dtype.kind in "US":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in a.tolist()]
    raise UserError(
        f"{path}: array {key!r} is {a.dtype}; classification needs integer or string labels (or set task: regression)"
    )


def _float_targets(a: np.ndarray, path: Path, key: str) -> Tensor:
    if a.ndim not in (1, 2) or not np.issubdtype(a.dtype, np.number):
        raise UserError(f"{path}: array {key!r} is {a.dtype} of shape {a.shape}; regression targets are (N,) or (N, k)")
    y = a.astype(np.float32)
    bad = np.argwhere(~np.isfinite(y))
    if len(bad):
        raise UserError(f"{path}: array {key!r} holds {y[tuple(bad[0])]} at index {tuple(int(i) for i in bad[0])}")
    return torch.from_numpy(y)


def open_npz(path: str) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not an .npz file ({str(e).splitlines()[0]})") from None


def read_npz(path: str, x_key: str, y_key: str, task: str) -> Source:
    """Arrays `x_key` (N, ...) and `y_key` (N,) [(N, k) for regression], with `<key>_test` as the test split."""
    p = Path(path)
    with open_npz(path) as npz:
        x = npz_inputs(npz_array(npz, x_key, p, "data.x_key"), p, x_key)
        y_raw = npz_array(npz, y_key, p, "data.y_key")
        tx, ty = f"{x_key}_test", f"{y_key}_test"
        has = [k in npz.files for k in (tx, ty)]
        if any(has) and not all(has):
            given, absent = (tx, ty) if has[0] else (ty, tx)
            raise UserError(f"{p}: has {given!r} but no {absent!r}; a test split needs both")
        test = None
        if all(has):
            test = (npz_inputs(npz_array(npz, tx, p, "data.x_key"), p, tx), npz_array(npz, ty, p, "data.y_key"))
    if len(x) != len(y_raw):
        raise UserError(f"{p}: {len(x)} samples in {x_key!r} but {len(y_raw)} in {y_key!r}")
    if test is not None:
        if len(test[0]) != len(test[1]):
            raise UserError(f"{p}: {len(test[0])} samples in {tx!r} but {len(test[1])} in {ty!r}")
        if test[0].shape[1:] != x.shape[1:] or test[0].dtype != x.dtype:
            raise UserError(
                f"{p}: {tx!r} is {test[0].dtype} {tuple(test[0].shape[1:])} per sample, "
                f"{x_key!r} {x.dtype} {tuple(x.shape[1:])}"
            )
    if task == "regression":
        y = _float_targets(y_raw, p, y_key)
        yt = _float_targets(test[1], p, ty) if test is not None else None
        if yt is not None and yt.shape[1:] != y.shape[1:]:
            raise UserError(f"{p}: {ty!r} has shape {tuple(yt.shape)}, {y_key!r} {tuple(y.shape)}")
        return Source(x, y, x_test=test[0] if test else None, y_test=yt)
    labels = _label_strings(y_raw, p, y_key)
    test_labels = _label_strings(test[1], p, ty) if test is not None else []
    _, classes = encode_labels(labels + test_labels, f"{p}: {y_key!r}")
    y = apply_classes(labels, classes, f"{p}: {y_key!r}")
    if test is None:
        return Source(x, y, classes=classes)
    return Source(x, y, x_test=test[0], y_test=apply_classes(test_labels, classes, f"{p}: {ty!r}"), classes=classes)


def npz_spec(path: str, x_key: str, y_key: str, task: str) -> tuple[tuple[int, ...], int] | None:
    """(sample shape, outputs) of an .npz without reading its inputs: the shapes from the .npy headers, the
    class count from the labels alone. None where the file does not tell (the full read names the problem)."""
    shape, y_shape = _npy_shape(path, x_key), _npy_shape(path, y_key)
    if len(shape) < 2 or not y_shape:
        return None
    if task == "regression":
        return shape[1:], 1 if len(y_shape) == 1 else y_shape[1]
    try:
        with open_npz(path) as npz:
            labels = [npz[k] for k in (y_key, f"{y_key}_test") if k in npz.files]
        return shape[1:], len({str(v) for a in labels for v in a.tolist()})
    except (UserError, ValueError, OSError, zipfile.BadZipFile):
        return None


def _npy_shape(path: str, key: str) -> tuple[int, ...]:
    """The shape of array `key`, read from the .npy header inside the zip (no data read); () if unreadable."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape = read(f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # the full read names the problem
        return ()
    return tuple(int(s) for s in shape)


# ---------------------------------------------------------------- image folders


def list_images(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder's layout: ROOT/<class>/**/*.jpg|jpeg|png, classes in sorted order (or those given)."""
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = dirs
        if len(classes) < 2:
            raise UserError(
                f"data.path: {root} has {len(classes)} class folder(s); classification needs two "
                "(layout: ROOT/<class>/*.png|jpg, or ROOT/train/<class>/...)"
            )
    else:
        extra = [d for d in dirs if d not in classes]
        if extra:
            raise UserError(
                f"data.path: {root / extra[0]} is a class the training folder does not have "
                f"(training classes: {', '.join(classes)})"
            )
    files, labels = [], []
    for i, c in enumerate(classes):
        found = (
            sorted(f for f in (root / c).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if (root / c).is_dir()
            else []
        )
        files += found
        labels += [i] * len(found)
    if not files:
        raise UserError(f"data.path: no .jpg/.jpeg/.png images under {root}/<class>/")
    return files, labels, classes


def image_files(root: Path) -> list[Path]:
    """Every .jpg/.jpeg/.png below `root`, sorted (predict's folder input: any layout)."""
    return sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def _read(path: Path) -> Tensor:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if not data:
        raise UserError(f"{path}: empty file, not an image")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, h, w) uint8 -> (C, H, W) uint8: antialiased bilinear, as torchvision's Resize on tensors."""
    if tuple(img.shape[1:]) == size:
        return img
    out = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def decode_images(files: Sequence[Path], image_size: Sequence[int], channels: int = CHANNELS) -> Tensor:
    """Decode every file to RGB (or grey for channels=1), resized to image_size: uint8 (N, C, H, W).

    JPEGs go through torchvision's batched `decode_jpeg(list)` (DECODE_CHUNK files per call: one call into
    libjpeg-turbo's loop instead of a Python round trip per image), on one thread; PNGs one by one. On this
    2-core machine at load ~1 that was 1.7x faster than `decode_image` per file on 10,000 CIFAR JPEGs, and
    1.5x faster than 2 threads over batched chunks; at load ~9 (other jobs) the order reversed (2 threads
    1.5x faster, bench/decode_folder.py). Which wins on a quiet machine is still to be measured there.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    size = (int(image_size[0]), int(image_size[1]))
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    out = torch.empty((len(files), channels, *size), dtype=torch.uint8)
    for start in range(0, len(files), DECODE_CHUNK):
        chunk = list(files[start : start + DECODE_CHUNK])
        data = [_read(f) for f in chunk]
        jpeg = [i for i, d in enumerate(data) if len(d) > 2 and d[0] == 0xFF and d[1] == 0xD8]
        images: list[Tensor | None] = [None] * len(chunk)
        if jpeg:
            try:
                decoded = decode_jpeg([data[i] for i in jpeg], mode=mode)
            except RuntimeError:  # one bad file fails the batch: decode one by one below to name it
                decoded = [None] * len(jpeg)
            for i, img in zip(jpeg, decoded, strict=True):
                images[i] = img
        for i, img in enumerate(images):
            if img is None:
                try:
                    img = decode_image(data[i], mode=mode)
                except RuntimeError as e:
                    raise UserError(f"{chunk[i]}: not a readable image ({str(e).splitlines()[0]})") from None
            out[start + i] = _resize(img, size)
    return out


def folder_layout(root: Path) -> dict[str, Path]:
    """{"train": ..., "val"?: ..., "test"?: ...} for ROOT/train/ layouts, else {"all": ROOT}."""
    if (root / "train").is_dir():
        return {k: root / k for k in ("train", "val", "test") if (root / k).is_dir()}
    return {"all": root}


def folder_classes(path: str) -> list[str]:
    """The class names of a folder dataset, from its folder names alone."""
    root = Path(path)
    layout = folder_layout(root)
    top = layout.get("train", root)
    return sorted(d.name for d in top.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_folder(path: str, image_size: Sequence[int]) -> Source:
    """An image folder (ImageFolder layout, or train/ [+ val/, test/] each in that layout) as uint8 images."""
    from deepnets.memory import check_decode_fits

    root = Path(path)
    layout = folder_layout(root)
    train_dir = layout.get("train", root)
    files, labels, classes = list_images(train_dir)
    parts = {"train": (files, labels)}
    for split in ("val", "test"):
        if split in layout:
            f, lab, _ = list_images(layout[split], classes)
            parts[split] = (f, lab)
    n = sum(len(f) for f, _ in parts.values())
    check_decode_fits(n, (CHANNELS, int(image_size[0]), int(image_size[1])), root)
    decoded = {k: (decode_images(f, image_size), torch.tensor(lab, dtype=torch.int64)) for k, (f, lab) in parts.items()}
    x, y = decoded["train"]
    val = decoded.get("val", (None, None))
    test = decoded.get("test", (None, None))
    return Source(x, y, x_val=val[0], y_val=val[1], x_test=test[0], y_test=test[1], classes=classes)
