"""Weights packed for a web page: 8-bit codes, deflated, base64 (what the page's script unpacks).

A head's (T, T) weights become codes: weights of at least 1/255 are rounded to the nearest multiple
of 1/255 (within 1/510), smaller ones get code 0, and each row carries a ``rest``: what its code-0
cells must add up to for the row to keep its sum (its small weights plus the rounding error of the
others), at most 1/255 per cell. The page shows each code-0 weight as its row's rest spread evenly. So
every weight is shown within 1/255 (0.004), rows keep their sums (within 0.004 on MiniLM at 512
tokens), and a head spread thinly over 500 tokens (0.002 each) looks as broad as it is, not empty.
(Rounding every weight to the nearest code instead lifts each such 0.002 to 0.004: rows of MiniLM
at 512 tokens summed to 1.2.) Codes and rests are deflated (zlib), which browsers undo natively
(``DecompressionStream("deflate")``): MiniLM's 72 heads over 512 tokens, 18.9 M weights, take about
2.4 MB of base64 instead of 150 MB of JSON numbers.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

LEVELS = 255  # codes 1..255: w ~ code / 255; code 0: below 1/255
PRECISION = ("each weight within 0.004 (8-bit codes); weights below 1/255 are shown as their row's mean "
             "below it, so rows keep their sums")


def _b64_deflate(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def pack_head(weights: np.ndarray) -> dict:
    """One head's (T, T) weights -> {"codes": str, "rest": str} (base64 of deflated uint8 / uint16)."""
    w = np.clip(np.asarray(weights, np.float64), 0.0, 1.0)  # (T, T)
    small = w < 1.0 / LEVELS  # (T, T)
    codes = np.where(small, 0, np.maximum(np.rint(w * LEVELS), 1)).astype(np.uint8)  # (T, T)
    missing = w.sum(-1) - (codes / LEVELS).sum(-1)  # (T,) what the code-0 cells must add up to
    rest = np.clip(missing, 0.0, small.sum(-1) / LEVELS)  # (T,) at most 1/255 a cell: each stays within 1/255
    rest16 = np.rint(np.clip(rest, 0.0, 1.0) * 65535).astype("<u2")  # (T,)
    return {"codes": _b64_deflate(codes.tobytes()), "rest": _b64_deflate(rest16.tobytes())}


def unpack_head(packed: dict, n: int) -> np.ndarray:
    """What the page shows for a packed head: (n, n) float64 (for tests; the page does the same in JS)."""
    codes = np.frombuffer(zlib.decompress(base64.b64decode(packed["codes"])), np.uint8).reshape(n, n)
    rest = np.frombuffer(zlib.decompress(base64.b64decode(packed["rest"])), "<u2") / 65535.0  # (n,)
    zeros = (codes == 0).sum(-1)  # (n,)
    fill = np.where(zeros > 0, rest / np.maximum(zeros, 1), 0.0)  # (n,)
    return np.where(codes == 0, fill[:, None], codes / LEVELS)


def size(packed: dict) -> int:
    """Characters the packed head adds to a page."""
    return len(packed["codes"]) + len(packed["rest"]) + 40
