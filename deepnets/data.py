"""Datasets as in-memory tensors, served by a seeded, resumable, device-side batch loader.

Every dataset here fits in memory, so a `DataLoader` with per-sample
`__getitem__` + collate is pure overhead: batches are taken by index from a
per-epoch permutation of tensors that already live on the training device.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from deepnets import userdata
from deepnets.config import USER_DATA, DataConfig
from deepnets.errors import UserError
from deepnets.userdata import Source

# (input shape, classes) known before any file is read, so the model can be built first.
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


@dataclass
class Splits:
    """Inputs (N, *input_shape) and targets for each split, with the preprocessing `state` (see `preprocess`).

    Inputs are float32, already preprocessed, or uint8 images (`state["uint8"]`), which the loaders
    preprocess per batch on the device. Targets: int64 (N,) class ids, or float32 (N,) / (N, k) for
    regression, in the target's own units.
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    state: dict[str, Any] = field(default_factory=dict)


class TensorBatches:
    """Batches of `(x, y)` taken by index from tensors, in a seeded order per epoch.

    Epoch e visits `randperm(n, seed + e)` (or 0..n-1 without shuffling);
    with `world_size` > 1 each rank takes a disjoint, equally long shard of
    it. The loader is `_Stateful` for Lightning: its state (epoch, batches
    consumed) goes into checkpoints, so a run resumed mid-epoch sees exactly
    the batches it had not seen yet.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = False,
        drop_last: bool = False,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.x, self.y = x, y  # (N, ...), (N,)
        self.transform = transform  # per batch, on the device: uint8 images -> preprocessed float
        self.drop_last = drop_last  # leave out a last, smaller batch (BatchNorm cannot train on one sample)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.augment = augment
        self.epoch = 0
        self.position = 0  # batches of `epoch` already handed out
        # Training shards drop the tail so every rank runs the same number of steps
        # (DDP would hang otherwise); evaluation shards keep every sample.
        n = len(x)
        self._shard_len = n // world_size if shuffle and world_size > 1 else math.ceil(n / world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self._shard_len // self.batch_size
        return math.ceil(self._shard_len / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """The sample indices this rank visits in `epoch`, in order. (shard_len,) int64."""
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            order = order[self.rank :: self.world_size][: self._shard_len]
        return order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._batches()

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Epoch and position are read at the first batch, not at iter(): Lightning calls iter() before a
        # resumed run loads the loader state back (deepnets.run.ResumeLoaderState). A finished epoch
        # (position at the end, as in an epoch-end checkpoint) moves on to the next one.
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        epoch, start = self.epoch, self.position
        order = self.indices(epoch).to(self.x.device, non_blocking=True)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            # index_select, not x[idx]: the same gather, 2.3x faster on the CPU (advanced indexing's general path)
            x = self.x.index_select(0, idx)
            if self.transform is not None:
                x = self.transform(x)
            if self.augment:  # seeded per (epoch, batch), so a resumed epoch draws the same crops
                g = torch.Generator().manual_seed(((self.seed * 100_003 + epoch) * 100_003 + b) * (self.rank + 1))
                x = random_crop_flip(x, g)
            self.position = b + 1
            yield x, self.y.index_select(0, idx)

    # Lightning does not pre-fetch from loaders with a length, so batches handed
    # out = batches consumed; the state is read when a checkpoint is written.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["consumed"])


def in_huge_pages(x: Tensor, min_bytes: int = 32 << 20) -> Tensor:
    """A copy of CPU tensor `x` in memory Linux backs with 2 MiB pages, or `x` itself where it can't be.

    Shuffled batches gather rows from all over the training set: with 4 KiB pages each row of a set
    larger than the TLB's reach (~8 MiB) costs a page walk. In transparent huge pages the gather of an
    MNIST-sized epoch is ~17% faster (bench/overhead.py's loader row). Linux's default THP mode,
    `madvise`, gives them only to memory that asks, and torch's allocator asks only under an
    environment variable read at import: so the memory is mapped and advised here.
    """
    if x.device.type != "cpu" or x.nbytes < min_bytes or not hasattr(mmap, "MADV_HUGEPAGE"):
        return x
    buf = mmap.mmap(-1, x.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP
        buf.close()
        return x
    out = torch.frombuffer(buf, dtype=x.dtype, count=x.numel()).view(x.shape)  # keeps buf alive
    return out.copy_(x)


def random_crop_flip(x: Tensor, g: torch.Generator, pad: int = 4) -> Tensor:
    """CIFAR augmentation for a whole batch at once: random crop after zero padding, random h-flip.

    x: (B, C, H, W). Offsets come from a CPU generator so the result does not
    depend on the device.
    """
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
    flip = torch.rand(B, generator=g).to(x.device) < 0.5
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = ox[:, None] + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (B, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


# ---------------------------------------------------------------- reading datasets


def _load_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    return x, torch.tensor(d.target, dtype=torch.int64)


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's layout: <root>/<folder>/raw/


def _data_folder(cfg: DataConfig) -> Path:
    if cfg.name == "cifar10":
        return Path(cfg.root) / CIFAR10_FOLDER
    return Path(cfg.root) / IDX_FOLDERS[cfg.name] / "raw"


def _file_names(name: str, train: bool) -> list[str]:
    if name == "cifar10":
        return CIFAR10_TRAIN if train else CIFAR10_TEST
    prefix = "train" if train else "t10k"
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def _load_files(cfg: DataConfig, train: bool) -> tuple[Tensor, Tensor]:
    """The train or test split of mnist / fashion_mnist / cifar10 from torchvision's file layout under data.root.

    torchvision only downloads (its archives are MD5-checked); the files are read here, as data: the IDX
    files by their header, the CIFAR-10 pickles by `SafeCifarUnpickler`, which builds nothing but arrays,
    dicts, lists, strings and numbers. (torchvision's readers would unpickle code, or accept labels and
    image sizes the model cannot take.)
    """
    folder = _data_folder(cfg)
    files = [folder / f for f in _file_names(cfg.name, train)]
    if not all(f.is_file() for f in files) and cfg.download:
        _download(cfg)
    if not all(f.is_file() for f in files):
        raise UserError(
            f"{cfg.name} files not found under data.root={cfg.root} (expected {_expected_files(cfg.name, folder)}); "
            "set data.download=true or copy the files there"
        )
    if cfg.name == "cifar10":
        parts = [read_cifar_batch(f) for f in files]
        data = torch.cat([p[0] for p in parts])  # (N, 3, 32, 32) uint8
        y = torch.cat([p[1] for p in parts])
    else:
        data, y = read_idx_pair(files[0], files[1])  # (N, 1, 28, 28) uint8, (N,)
    return data.contiguous().float().div_(255.0), y


def _download(cfg: DataConfig) -> None:
    """Fetch the files with torchvision (it checks the archives' MD5 sums); reading them is ours."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        if cfg.name == "cifar10":
            c = datasets.CIFAR10
            download_and_extract_archive(c.url, cfg.root, filename=c.filename, md5=c.tgz_md5)
        else:  # MNIST's download() fetches and checks the four .gz files of every mirror in turn
            cls = datasets.MNIST if cfg.name == "mnist" else datasets.FashionMNIST
            cls(root=cfg.root, train=True, download=True)
    except Exception as e:  # URLError, OSError, RuntimeError("File not found or corrupted"), ...
        raise UserError(f"downloading {cfg.name} into data.root={cfg.root} failed: {_first_line(e)}") from None


# -- IDX (MNIST, Fashion-MNIST): http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"

IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float", 0x0E: "double"}
MNIST_IMAGE = (28, 28)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions, checked against its header. uint8 array."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {_first_line(e)}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path}: corrupt or truncated: not an IDX file (it does not start with two zero bytes)")
    code, nd = raw[2], raw[3]
    if code != 0x08:
        kind = IDX_TYPES.get(code, "unknown")
        raise UserError(f"{path}: IDX type code 0x{code:02X} ({kind}); MNIST-format files hold unsigned bytes (0x08)")
    if nd != ndim:
        raise UserError(f"{path}: an IDX file of {nd} dimensions, expected {ndim}")
    start = 4 + 4 * nd
    if len(raw) < start:
        raise UserError(f"{path}: corrupt or truncated: the header ends after {len(raw)} bytes")
    dims = struct.unpack(f">{nd}I", raw[4:start])
    size = math.prod(dims)
    if len(raw) - start != size:
        shape = "x".join(map(str, dims))
        raise UserError(
            f"{path}: corrupt or truncated: the header says {shape} = {size} bytes, the file holds {len(raw) - start}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=start).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 from an MNIST-format pair, every mismatch named."""
    images = read_idx(images_path, 3)
    if images.shape[1:] != MNIST_IMAGE:
        h, w = images.shape[1:]
        raise UserError(f"{images_path}: images are {h}x{w}, MNIST-format images are 28x28")
    labels = read_idx(labels_path, 1)
    bad = np.flatnonzero(labels >= num_classes)
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{labels_path}: label {int(labels[i])} at index {i} is outside 0..{num_classes - 1}")
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# -- CIFAR-10's python batches: pickles of {"data": (N, 3072) uint8, "labels": [int] * N, ...}


class _Refused(pickle.UnpicklingError):
    pass


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, limited to that use."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    """The few callables a CIFAR-format pickle names: numpy's array and scalar reconstruction.

    Taken from numpy's own `__reduce__`s rather than imported by the names the file gives, under both
    spellings of numpy's module (`numpy.core` until numpy 2, `numpy._core` since).
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


class SafeCifarUnpickler(pickle.Unpickler):
    """An unpickler that builds arrays, dicts, lists, tuples, strings, bytes and numbers, and nothing else.

    A pickle runs code only through the callables it names (GLOBAL / STACK_GLOBAL / INST / EXT opcodes, all of
    which go through `find_class`) or persistent ids: names outside `_cifar_globals()` and every persistent id
    are refused before anything is called (the "Restricting Globals" recipe of the `pickle` docs).
    """

    _globals = _cifar_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: object) -> object:
        raise _Refused("a persistent id")


def read_cifar_batch(path: Path, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR-10 batch file, read as data only."""
    try:
        with open(path, "rb") as f:
            entry = SafeCifarUnpickler(f, encoding="latin1").load()  # latin1: the batches are Python 2 pickles
    except _Refused as e:
        raise UserError(
            f"{path}: refused: the pickle calls {e}, which is code, not CIFAR-10 data (nothing was run)"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {_first_line(e)}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... of a damaged file
        raise UserError(f"{path}: corrupt or truncated: {_first_line(e)}") from None
    if not isinstance(entry, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (a pickled {type(entry).__name__}, not a dict)")
    data, labels = (entry.get(k, entry.get(k.encode())) for k in ("data", "labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: not a CIFAR-10 batch ('data' is {what}, expected uint8 N x 3072)")
    y = np.asarray(labels) if isinstance(labels, list | np.ndarray) else None
    if y is None or y.ndim != 1 or not (len(y) == 0 or np.issubdtype(y.dtype, np.integer)):
        raise UserError(f"{path}: not a CIFAR-10 batch ('labels' is not a list of integers)")
    if len(y) != len(data):
        raise UserError(f"{path}: {len(data)} images but {len(y)} labels")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{path}: label {int(y[i])} at index {i} is outside 0..{num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)  # CHW, as the format stores it
    return images, torch.from_numpy(y.astype(np.int64))


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _expected_files(name: str, folder: Path) -> str:
    names = [*CIFAR10_TRAIN, *CIFAR10_TEST] if name == "cifar10" else _file_names(name, True) + _file_names(name, False)
    return f"{folder}/ with {', '.join(names)}"


def _synthetic(cfg: DataConfig, task: str = "classification") -> tuple[Tensor, Tensor]:
    """Seeded Gaussian class clusters (classification) or a seeded teacher (regression): learnable, any shape,
    any size."""
    g = torch.Generator().manual_seed(cfg.split_seed + 12345)
    if task == "regression":
        return _synthetic_regression(cfg, g)
    d = math.prod(cfg.input_shape)
    means = torch.randn(cfg.num_classes, d, generator=g)
    y = torch.randint(0, cfg.num_classes, (cfg.num_samples,), generator=g)
    x = means[y] + 2.0 * torch.randn(cfg.num_samples, d, generator=g)  # (N, d)
    return x.view(cfg.num_samples, *cfg.input_shape), y


SYNTHETIC_TEACHER_WIDTH = 16


def _synthetic_regression(cfg: DataConfig, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """The lecture's first model as a teacher: y = 100 + 20 v^T tanh(W x) / sqrt(m) + 2 noise, x ~ N(0, I),
    W ~ N(0, 1/d) (m, d), v ~ N(0, 1) (m,), m = 16. Float targets (N,) far from zero mean and unit std,
    so standardising them matters; the noise sets the best reachable MSE (4)."""
    d, m, n = math.prod(cfg.input_shape), SYNTHETIC_TEACHER_WIDTH, cfg.num_samples
    x = torch.randn(n, d, generator=g)  # (N, d)
    W = torch.randn(m, d, generator=g) / math.sqrt(d)  # (m, d)
    v = torch.randn(m, generator=g)  # (m,)
    y = 100.0 + 20.0 * torch.tanh(x @ W.T) @ v / math.sqrt(m) + 2.0 * torch.randn(n, generator=g)  # (N,)
    return x.view(n, *cfg.input_shape), y


def _split(n: int, fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=g)
    k = round(n * fraction)
    return perm[k:], perm[:k]


def flip_labels(y: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """Return a copy of y with exactly round(fraction * n) labels changed to a different class."""
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    idx = torch.randperm(n, generator=g)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (len(idx),), generator=g)  # never 0: always a new class
    out = y.clone()
    out[idx] = (y[idx] + shift) % num_classes
    return out


# ---------------------------------------------------------------- the dataset table

DIGIT_CLASSES = [str(i) for i in range(10)]
CLASS_NAMES = {  # torchvision's `classes` of each built-in dataset
    "digits": DIGIT_CLASSES,
    "mnist": DIGIT_CLASSES,
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


@dataclass(frozen=True)
class Dataset:
    """One entry of DATASETS: `read(cfg, task)` gives the samples; `spec(cfg, task)` the (input shape,
    outputs) from as little reading as the files allow, or None where only a full read tells."""

    read: Callable[[DataConfig, str], Source]
    spec: Callable[[DataConfig, str], tuple[tuple[int, ...], int] | None]


def _builtin(cfg: DataConfig, task: str) -> Source:
    if cfg.name == "digits":
        x, y = _load_digits()
        return Source(x, y, classes=DIGIT_CLASSES)
    if cfg.name == "synthetic":
        x, y = _synthetic(cfg, task)
        return Source(x, y, classes=[str(i) for i in range(cfg.num_classes)] if task == "classification" else None)
    x, y = _load_files(cfg, train=True)
    x_test, y_test = _load_files(cfg, train=False)
    return Source(x, y, x_test=x_test, y_test=y_test, classes=CLASS_NAMES[cfg.name])


def _builtin_spec(cfg: DataConfig, task: str) -> tuple[tuple[int, ...], int]:
    if cfg.name == "synthetic":
        return tuple(cfg.input_shape), cfg.num_classes if task == "classification" else 1
    return SHAPES[cfg.name]


def _csv_spec(cfg: DataConfig, task: str) -> tuple[tuple[int, ...], int] | None:
    if task == "classification":  # the class count needs the whole target column
        return None
    assert cfg.path is not None and cfg.target is not None
    d = userdata.csv_spec(cfg.path, cfg.target, cfg.features)
    return ((d,), 1 if isinstance(cfg.target, str) else len(cfg.target)) if d else None


def _folder_spec(cfg: DataConfig, task: str) -> tuple[tuple[int, ...], int] | None:
    assert cfg.path is not None and cfg.image_size is not None
    classes = userdata.folder_classes(cfg.path)
    return ((userdata.CHANNELS, *cfg.image_size), len(classes)) if len(classes) >= 2 else None


def _must(value: Any) -> Any:
    assert value is not None  # check_data_keys made sure when the config loaded
    return value


DATASETS: dict[str, Dataset] = {
    "digits": Dataset(_builtin, _builtin_spec),
    "mnist": Dataset(_builtin, _builtin_spec),
    "fashion_mnist": Dataset(_builtin, _builtin_spec),
    "cifar10": Dataset(_builtin, _builtin_spec),
    "synthetic": Dataset(_builtin, _builtin_spec),
    "csv": Dataset(lambda c, t: userdata.read_csv(_must(c.path), _must(c.target), c.features, t), _csv_spec),
    "npz": Dataset(
        lambda c, t: userdata.read_npz(_must(c.path), c.x_key, c.y_key, t),
        lambda c, t: userdata.npz_spec(_must(c.path), c.x_key, c.y_key, t),
    ),
    "folder": Dataset(lambda c, t: userdata.read_folder(_must(c.path), _must(c.image_size)), _folder_spec),
}


def check_data_files(cfg: DataConfig) -> None:
    """data.path exists and is of the kind data.name reads (its contents are checked when read)."""
    if cfg.name not in USER_DATA or cfg.path is None:
        return
    p = Path(cfg.path)
    where = f"data.path={cfg.path}"
    if not p.exists():
        raise UserError(f"{where} does not exist")
    if cfg.name == "folder":
        if not p.is_dir():
            raise UserError(f"{where} is not a directory; data.name=folder reads ROOT/<class>/*.png|jpg")
        return
    if not p.is_file():
        raise UserError(f"{where} is not a file; data.name={cfg.name} reads one .{cfg.name} file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{where}: cannot read the file (permission denied)")
    if cfg.name == "npz" and not zipfile.is_zipfile(p):
        raise UserError(f"{where} is not an .npz file (not a zip archive; write it with numpy.savez)")


# ---------------------------------------------------------------- splits and preprocessing


def load_splits(cfg: DataConfig, seed: int, task: str = "classification") -> Splits:
    """Read the dataset and cut it into train/val/test, all on the CPU, with the preprocessing state.

    Float inputs come back preprocessed; uint8 images stay uint8 (the loaders preprocess each batch).
    """
    src = DATASETS[cfg.name].read(cfg, task)
    g = torch.Generator().manual_seed(cfg.split_seed)
    x, y = src.x, src.y
    if src.x_test is None:
        train_idx, test_idx = _split(len(x), cfg.test_fraction, g)
        x_test, y_test = x[test_idx], y[test_idx]
        x, y = x[train_idx], y[train_idx]
    else:
        x_test, y_test = src.x_test, _must(src.y_test)
    if src.x_val is None:
        train_idx, val_idx = _split(len(x), cfg.val_fraction, g)
        x_val, y_val = x[val_idx], y[val_idx]
    else:  # the files' own validation split (a folder's val/)
        train_idx, x_val, y_val = torch.arange(len(x)), src.x_val, _must(src.y_val)
    if cfg.train_size is not None:
        if cfg.train_size > len(train_idx):
            raise UserError(f"data.train_size={cfg.train_size} exceeds the {len(train_idx)} training samples")
        train_idx = train_idx[: cfg.train_size]
    x_train, y_train = x[train_idx], y[train_idx]
    if cfg.label_noise > 0:
        if task != "classification":
            raise UserError(f"data.label_noise={cfg.label_noise}: flips class labels; task={task} has none")
        y_train = flip_labels(y_train, cfg.label_noise, len(_must(src.classes)), seed=cfg.split_seed + 1)
    _check_split_sizes(cfg, len(y_train), len(y_val), len(y_test), src.x_test is not None)
    num_outputs = len(src.classes) if task == "classification" and src.classes else _target_width(y_train)
    state: dict[str, Any] = {
        "version": 1,
        "dataset": cfg.name,
        "task": task,
        "input_shape": list(x_train.shape[1:]),
        "num_outputs": num_outputs,
        "classes": src.classes if task == "classification" else None,
        "features": src.features,
        "targets": src.targets,
        "x_key": cfg.x_key if cfg.name == "npz" else None,
        "image_size": list(cfg.image_size) if cfg.image_size is not None else None,
        "uint8": x_train.dtype == torch.uint8,
        "mean": None,
        "std": None,
        "zca_mean": None,
        "zca_W": None,
    }
    s = Splits(x_train, y_train, x_val, y_val, x_test, y_test, state)
    if state["uint8"]:  # statistics of x / 255, in float64 chunks (the float copy of the set is never made)
        if cfg.standardize:
            state["mean"], state["std"] = _uint8_moments(x_train)
        if cfg.whiten == "zca":
            state["zca_mean"], state["zca_W"] = _uint8_zca(x_train, state, cfg.whiten_eps)
        return s
    if cfg.standardize:
        _standardize(s)
    if cfg.whiten == "zca":
        _zca(s, cfg.whiten_eps)
    return s


def _target_width(y: Tensor) -> int:
    return 1 if y.dim() == 1 else int(y.shape[1])


def _check_split_sizes(cfg: DataConfig, n_train: int, n_val: int, n_test: int, given_test: bool = False) -> None:
    """Splits too small to mean anything fail here, naming the keys that made them: a training split
    of one sample has no std (standardisation turns it into NaN) and no BatchNorm statistics, and an
    empty val/test split would report no metrics (or NaN ones) under a `completed` status."""
    sizes = f"{n_train}/{n_val}/{n_test} train/val/test samples"
    if n_train < 2:
        keys = "data.train_size" if cfg.train_size is not None else "data.val_fraction / data.test_fraction"
        raise UserError(f"data: the training split has {n_train} sample(s) ({sizes}); at least 2 needed (check {keys})")
    if cfg.val_fraction > 0 and n_val == 0:
        raise UserError(f"data.val_fraction={cfg.val_fraction} leaves an empty validation split ({sizes})")
    if n_test == 0:
        if cfg.name in USER_DATA:
            key = f"data.path={cfg.path}" if given_test else f"data.test_fraction={cfg.test_fraction}"
        else:
            key = f"data.test_fraction={cfg.test_fraction}" if cfg.name in ("digits", "synthetic") else "data.root"
        raise UserError(f"{key}: the test split is empty ({sizes})")


def _stat_dims(x: Tensor) -> tuple[int, ...]:
    return (0, 2, 3) if x.dim() == 4 else (0,)


def _standardize(s: Splits) -> None:
    """Zero mean, unit std per channel (images) or per feature (vectors), from training statistics."""
    dims = _stat_dims(s.x_train)
    mean = s.x_train.mean(dim=dims, keepdim=True)
    std = s.x_train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    s.state["mean"], s.state["std"] = mean[0], std[0]  # (C, 1, 1) or (D,): a sample's shape, broadcast
    for name in ("x_train", "x_val", "x_test"):
        setattr(s, name, (getattr(s, name) - mean) / std)


def _uint8_moments(x: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and std (unbiased, as Tensor.std) of x / 255 over `_stat_dims`, accumulated in float64 chunks."""
    dims = _stat_dims(x)
    total = sq = None
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].double().div_(255.0)
        a, b = part.sum(dim=dims, keepdim=True), (part * part).sum(dim=dims, keepdim=True)
        total, sq = (a, b) if total is None else (total + a, sq + b)
    assert total is not None and sq is not None
    count = x.numel() // math.prod(total.shape)
    mean = total / count
    var = (sq - count * mean * mean) / (count - 1)
    return mean[0].float(), var.clamp_min(0).sqrt()[0].float().clamp_min(1e-6)


def zca_matrix(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Mean (D,) and ZCA whitening matrix W = U diag(1/sqrt(lambda + eps)) U^T (D, D) of x (N, D)."""
    x = x.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / (len(x) - 1)  # (D, D)
    lam, U = torch.linalg.eigh(cov)
    W = U @ torch.diag((lam.clamp_min(0) + eps).rsqrt()) @ U.T
    return mean.float(), W.float()


def _zca(s: Splits, eps: float) -> None:
    shape = s.x_train.shape[1:]
    mean, W = zca_matrix(s.x_train.flatten(1), eps)
    s.state["zca_mean"], s.state["zca_W"] = mean, W
    for name in ("x_train", "x_val", "x_test"):
        x = getattr(s, name)
        setattr(s, name, ((x.flatten(1) - mean) @ W).view(-1, *shape))


def _uint8_zca(x: Tensor, state: dict[str, Any], eps: float, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """`zca_matrix` of the standardised images, with the covariance summed in float64 chunks."""
    d = math.prod(x.shape[1:])
    total, outer = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = _apply(x[i : i + chunk], {**state, "zca_mean": None}).flatten(1).double()  # (B, D)
        total += part.sum(0)
        outer += part.T @ part
    n = len(x)
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)  # (D, D)
    lam, U = torch.linalg.eigh(cov)
    W = U @ torch.diag((lam.clamp_min(0) + eps).rsqrt()) @ U.T
    return mean.float(), W.float()


def _apply(x: Tensor, state: dict[str, Any]) -> Tensor:
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.dtype != torch.float32:
        x = x.float()
    if state.get("mean") is not None:
        x = (x - state["mean"].to(x.device)) / state["std"].to(x.device)
    if state.get("zca_mean") is not None:
        shape = x.shape[1:]
        x = ((x.flatten(1) - state["zca_mean"].to(x.device)) @ state["zca_W"].to(x.device)).view(-1, *shape)
    return x


def preprocess(x_raw: Tensor, state: dict[str, Any]) -> Tensor:
    """The training run's preprocessing of raw inputs (N, *input_shape), as the model saw them.

    uint8 -> float / 255, then (x - mean) / std with the training statistics (data.standardize), then
    ZCA whitening (data.whiten): the same operations, in the same order, as at training time.
    """
    return _apply(x_raw, state)


def _device_transform(state: dict[str, Any], device: torch.device) -> Callable[[Tensor], Tensor]:
    """`preprocess` with the statistics moved to `device` once, for the per-batch path of uint8 images."""
    on = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in state.items()}
    return lambda x: _apply(x, on)


def check_same_state(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """The data a run reads now is what its checkpoint was trained on: the same classes, columns, shape
    and statistics. A changed file would otherwise resume (or evaluate) a model on a different mapping."""
    for key in ("dataset", "task", "input_shape", "num_outputs", "classes", "features", "targets", "image_size"):
        if key in saved and saved[key] != now.get(key):
            raise UserError(
                f"{where}: the data differs from what the checkpoint was trained on: {key} was {saved[key]!r}, "
                f"the files give {now.get(key)!r} now"
            )
    for key in ("mean", "std", "zca_mean", "zca_W"):
        a, b = saved.get(key), now.get(key)
        if (a is None) != (b is None) or (a is not None and not torch.allclose(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-6)):
            raise UserError(
                f"{where}: the data differs from what the checkpoint was trained on: its {key} statistics "
                "do not match the training split read now (the file changed, or data.standardize / data.whiten did)"
            )


# ---------------------------------------------------------------- Lightning


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """Print `message` on stderr once per process, from rank zero only."""
    if message not in _NOTED and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        _NOTED.add(message)
        print(message, file=sys.stderr, flush=True)


class InMemoryDataModule(L.LightningDataModule):
    """Any dataset above as a LightningDataModule whose loaders are `TensorBatches` on the device.

    Its `state_dict` is the preprocessing state of `load_splits` (statistics as tensors, class names,
    column names, shapes: plain data, so checkpoints load with weights_only=True); Lightning stores it
    in every checkpoint and hands it back on resume, where it must match the data read again.
    """

    def __init__(self, cfg: DataConfig, seed: int, task: str = "classification") -> None:
        super().__init__()
        self.cfg, self.seed, self.task = cfg, seed, task
        self.splits: Splits | None = None
        self._train_loader: TensorBatches | None = None
        self._spec: tuple[tuple[int, ...], int] | None = None
        self._restored: dict[str, Any] | None = None

    def _shape_and_outputs(self) -> tuple[tuple[int, ...], int]:
        state = self.splits.state if self.splits is not None else self._restored
        if state:
            return tuple(state["input_shape"]), int(state["num_outputs"])
        if self._spec is None:
            self._spec = DATASETS[self.cfg.name].spec(self.cfg, self.task)
        if self._spec is None:  # only reading the data tells (a CSV's classes, an npz's arrays)
            self.setup()
            return self._shape_and_outputs()
        return self._spec

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape_and_outputs()[0]

    @property
    def num_outputs(self) -> int:
        """The model's output count: classes (classification), or k of (N, k) targets, 1 for (N,) ones."""
        return self._shape_and_outputs()[1]

    @property
    def num_classes(self) -> int:
        """Classification's name for `num_outputs` (kept for the code that says classes)."""
        return self.num_outputs

    @property
    def classes(self) -> list[str] | None:
        state = self.splits.state if self.splits is not None else self._restored
        return state.get("classes") if state else None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.splits.state) if self.splits is not None else dict(self._restored or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.splits is not None:
            where = f"data.path={self.cfg.path}" if self.cfg.path else f"data.name={self.cfg.name}"
            check_same_state(state_dict, self.splits.state, where)
        self._restored = dict(state_dict)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_splits(self.cfg, self.seed, self.task)
            if self._restored:  # a state given before the data was read (an export's): the data must match it
                where = f"data.path={self.cfg.path}" if self.cfg.path else f"data.name={self.cfg.name}"
                check_same_state(self._restored, self.splits.state, where)
            if self._device().type == "cpu":  # the one split gathered at random
                self.splits.x_train = in_huge_pages(self.splits.x_train)

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, x: Tensor, y: Tensor, train: bool) -> TensorBatches:
        dev = self._device()
        rank, world = self._rank()
        bs = self.cfg.batch_size if train else (self.cfg.eval_batch_size or 4 * self.cfg.batch_size)
        assert self.splits is not None
        state = self.splits.state
        augment = train and self.cfg.augment
        if augment and not (x.dim() == 4 and min(x.shape[2:]) >= 8):
            raise UserError(
                f"data.augment: random crops and flips need images (N, C, H, W) of at least 8x8; "
                f"data.name={self.cfg.name} gives samples of shape {tuple(x.shape[1:])}"
            )
        loader = TensorBatches(
            x.to(dev),
            y.to(dev),
            bs,
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            augment=augment,
            transform=_device_transform(state, dev) if state.get("uint8") else None,
        )
        if train and loader._shard_len % bs == 1 and self._has_batch_norm():
            # BatchNorm's batch statistics of one sample are undefined ("Expected more than 1 value per channel
            # when training"): drop that batch, as DataLoader(drop_last=True) would, and say so.
            loader.drop_last = True
            if len(loader) == 0:
                raise UserError(f"data: {loader._shard_len} training sample per process cannot train BatchNorm")
            _note_once(
                f"note: data.batch_size={bs} leaves a last training batch of 1 sample ({loader._shard_len} samples"
                f"{' per process' if world > 1 else ''}); BatchNorm cannot train on it, so every epoch leaves it out"
            )
        return loader

    def _has_batch_norm(self) -> bool:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        return module is not None and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()
        )

    def train_dataloader(self) -> TensorBatches:
        assert self.splits is not None
        if self._train_loader is None:  # one loader per fit, so its state survives reloads
            self._train_loader = self._loader(self.splits.x_train, self.splits.y_train, train=True)
        return self._train_loader

    def val_dataloader(self) -> TensorBatches:
        assert self.splits is not None
        return self._loader(self.splits.x_val, self.splits.y_val, train=False)

    def test_dataloader(self) -> TensorBatches:
        assert self.splits is not None
        return self._loader(self.splits.x_test, self.splits.y_test, train=False)
