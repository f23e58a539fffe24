"""TensorBoard event files without TensorBoard's pure-Python checksum.

TensorBoard, installed without TensorFlow, checksums every record it writes
(CRC-32C, twice per record) with a byte-by-byte Python loop: ~0.1 ms for a
scalar event and ~90 ms for a 300 KB image, run in its writer thread while
holding the GIL, so the training loop stalls for it. google-crc32c computes
the same checksum in C (~15 us per 300 KB).
"""

from __future__ import annotations

_MASK = 0xFFFFFFFF


def use_fast_crc() -> bool:
    """Swap the record writer's checksum for google-crc32c's C one; True if the C one is in use.

    Same checksums (tests compare both on random data), so the files are what
    TensorBoard itself would write. Safe to call repeatedly.
    """
    import google_crc32c  # deferred: only runs that write TensorBoard files need either
    from tensorboard.summary.writer import record_writer

    if getattr(record_writer.masked_crc32c, "fast", False):
        return True
    if google_crc32c.implementation != "c":  # its pure-Python fallback is no faster
        return False

    def masked_crc32c(data: bytes) -> int:
        x = google_crc32c.value(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & _MASK  # TFRecord's mask, as in TensorBoard

    masked_crc32c.fast = True  # type: ignore[attr-defined]
    record_writer.masked_crc32c = masked_crc32c
    return True
