"""TensorBoard's record checksum, swapped for a C one: same bytes on disk, readable by TensorBoard."""

from __future__ import annotations

import random

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard import SummaryWriter

from deepnets.tb import use_fast_crc


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(record_writer, "masked_crc32c", reference)  # undone after the test
    assert use_fast_crc()
    assert use_fast_crc()  # idempotent
    return record_writer.masked_crc32c


def test_same_checksum_as_tensorboards_own(fast) -> None:
    assert fast is not reference
    rng = random.Random(0)
    for n in (0, 1, 3, 8, 12, 255, 4096, 70_001):
        data = rng.randbytes(n)
        assert fast(data) == reference(data), n
    assert fast(b"123456789") == reference(b"123456789")


def test_event_files_written_with_it_read_back(fast, tmp_path) -> None:
    import numpy as np

    writer = SummaryWriter(str(tmp_path))
    for step in range(5):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.add_image("img", np.zeros((64, 64, 3), dtype=np.uint8), 0, dataformats="HWC")
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [round(e.value, 6) for e in acc.Scalars("loss")] == [1.0, 0.5, 0.333333, 0.25, 0.2]
    assert len(acc.Images("img")) == 1
