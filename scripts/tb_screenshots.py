"""Screenshots of TensorBoard's Custom Scalars, Images and HParams pages for the README.

    python scripts/tb_screenshots.py [--logdir DIR] [--out docs/figures] [--budget-ms 30000]

Without --logdir it first trains three short runs into a temporary logdir (a 12-layer sigmoid
MLP, the same with BatchNorm, a zero-init-residual ResNet; about a minute on 2 cores). Then it
starts TensorBoard on a free local port, renders each page in headless Chromium (Debian's
`chromium`) into `<out>/tensorboard_<page>.png`, and stops TensorBoard, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGES = {  # page -> (URL fragment, window size)
    "custom_scalars": ("#custom_scalars", (1400, 1500)),
    "images": ("#images", (1400, 1100)),
    "hparams": ("#hparams", (2500, 400)),  # wide: the metric columns follow the first hyperparameters
}
DEMO = {
    "deep_sigmoid": ["model.depth=12", "model.width=64", "model.activation=sigmoid"],
    "deep_sigmoid_bn": ["model.depth=12", "model.width=64", "model.activation=sigmoid", "model.batch_norm=true"],
    "resnet": ["model.arch=resnet", "model.stage_depths=[1,1,1]", "model.width=8", "model.zero_init_residual=true"],
}


def demo_logdir(root: Path) -> Path:
    """Three short runs on digits: two deep MLPs and a ResNet, each with the monitor every 5 steps."""
    from deepnets.config import load_config
    from deepnets.run import train

    for name, overrides in DEMO.items():
        cfg = load_config(
            None,
            [
                f"name={name}",
                f"output_dir={root}",
                "data.name=digits",
                "optim.lr=0.05",
                "scheduler.name=cosine",
                "trainer.max_epochs=6",
                "trainer.accelerator=cpu",
                "trainer.progress_bar=false",
                "logging.grad_norm_every_n_steps=5",
                "logging.weight_norms=true",
                *overrides,
            ],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(cfg)
        print(f"{name}: {result.status} {result.run_dir}", file=sys.stderr)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/data/plugins_listing", timeout=10) as r:
                if json.loads(r.read()).get("hparams", {}).get("enabled"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tensorboard did not answer within {timeout:.0f} s")


def screenshot(chromium: str, url: str, path: Path, size: tuple[int, int], budget_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={budget_ms}",  # let TensorBoard's JS fetch and draw
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", type=Path, help="TensorBoard logdir (default: train three demo runs first)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    p.add_argument("--budget-ms", type=int, default=30000, help="Chromium virtual-time budget per page")
    p.add_argument("--pages", default=",".join(PAGES), help=f"comma-separated subset of {', '.join(PAGES)}")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        logdir = args.logdir or demo_logdir(Path(tmp) / "runs")
        if not logdir.is_dir():
            print(f"error: --logdir {logdir}: no such directory", file=sys.stderr)
            return 2
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
        proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--reload_interval", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(base, proc, 120)
            args.out.mkdir(parents=True, exist_ok=True)
            for page in args.pages.split(","):
                fragment, size = PAGES[page]
                path = args.out / f"tensorboard_{page}.png"
                screenshot(chromium, f"{base}/{fragment}", path, size, args.budget_ms)
                print(path)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
