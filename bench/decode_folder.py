"""Decode CIFAR-10 as an image folder through the data module's own code, and time it.

    python bench/decode_folder.py            # all 60,000 JPEGs of ../shared/data/cifar10-jpeg.tar.gz
    python bench/decode_folder.py --quick    # 2,000 of them (a smoke test)

The archive is unpacked once into /tmp/deepnets-cifar10-jpeg (never into the repository). What is timed
is `deepnets.userdata.read_folder`, the function `data.name: folder` calls: listing, reading, batched
JPEG decoding (torchvision.io.decode_jpeg on DECODE_CHUNK files per call), into one uint8 tensor. Rounds
alternate the variants (A B A B), so a busy machine slows each alike; the load average is printed.

Variants: `batched` (what the data module does: decode_jpeg on a list of files, one thread) and, for
comparison, `per-file` (decode_image one file at a time) and `threads-N` (a thread pool over chunks of
batched calls), which the data module does not use because they were not faster here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepnets import userdata

REPO = Path(__file__).resolve().parent.parent
# ../shared/data beside the repository (a checkout in /work/main), or the shared folder itself (a worktree)
CANDIDATES = [REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz", Path("/work/shared/data/cifar10-jpeg.tar.gz")]
ARCHIVE = next((c for c in CANDIDATES if c.is_file()), CANDIDATES[0])
UNPACKED = Path("/tmp/deepnets-cifar10-jpeg")


def unpack(archive: Path) -> Path:
    root = UNPACKED / "CIFAR10-JPEG"
    if not (root / "test").is_dir():
        UNPACKED.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as t:
            t.extractall(UNPACKED, filter="data")
    return root


def subset(root: Path, n_per_class: int) -> Path:
    """A folder of the same layout with the first n images of each class (hard links: no copies)."""
    out = UNPACKED / f"subset-{n_per_class}"
    if not out.is_dir():
        for split in ("train", "test"):
            for c in sorted((root / split).iterdir()):
                (out / split / c.name).mkdir(parents=True, exist_ok=True)
                for f in sorted(c.iterdir())[:n_per_class]:
                    os.link(f, out / split / c.name / f.name)
    return out


def per_file(root: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    files = [f for split in ("train", "test") for f in userdata.list_images(root / split)[0]]
    return torch.stack([decode_image(userdata._read(f), mode=ImageReadMode.RGB) for f in files])


def threaded(root: Path, threads: int) -> torch.Tensor:
    files = [f for split in ("train", "test") for f in userdata.list_images(root / split)[0]]
    step = userdata.DECODE_CHUNK
    chunks = [files[i : i + step] for i in range(0, len(files), step)]
    with ThreadPoolExecutor(threads) as ex:
        return torch.cat(list(ex.map(lambda c: userdata.decode_images(c, (32, 32)), chunks)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 images (a smoke test)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = unpack(args.archive)
    if args.quick:
        root = subset(root, 100)
    variants = {
        "batched": lambda: userdata.read_folder(str(root), (32, 32)),
        "per-file": lambda: per_file(root),
        "threads-2": lambda: threaded(root, 2),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    n = 0
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            x = out.x if isinstance(out, userdata.Source) else out
            n = len(x) + (len(out.x_test) if isinstance(out, userdata.Source) and out.x_test is not None else 0)
    load = os.getloadavg()
    print(f"{n} images from {root} on {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| variant | threads | best s | images/s |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        threads = 2 if name == "threads-2" else 1
        label = f"{name} (data module)" if name == "batched" else name
        print(f"| {label} | {threads} | {min(ts):.2f} | {n / min(ts):,.0f} |")


if __name__ == "__main__":
    main()
