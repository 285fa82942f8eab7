"""Hash-based train/val/test split and the frozen test subset.

The split of a spectrum depends only on its id and the salt, so it is the same
whatever the chunking, the order or the number of rows, and it keeps its
meaning when a catalog is appended to.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["TRAIN", "VAL", "TEST", "SPLIT_NAMES", "id_hash", "assign_split", "frozen_test_mask"]

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def id_hash(ids: np.ndarray, salt: int = 0, stream: int = 0) -> np.ndarray:
    """Uniform [0, 1) value per id (splitmix64 of id, salt and stream).

    Parameters
    ----------
    ids : ndarray of int, shape (n,)
    salt : int
        Selects one of many equally valid splits.
    stream : int
        Independent hash streams (0 = split, 1 = frozen test ranking).
    """
    x = np.asarray(ids).astype(np.int64).view(np.uint64)
    key = _splitmix64(np.uint64(salt & 0xFFFFFFFFFFFFFFFF) ^ np.uint64((stream * int(_M2)) & 0xFFFFFFFFFFFFFFFF))
    h = _splitmix64(x ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def assign_split(ids: np.ndarray, fractions: Mapping[str, float], salt: int = 0) -> np.ndarray:
    """Split code per id: 0 = train, 1 = val, 2 = test. Shape (n,), int8."""
    u = id_hash(ids, salt, stream=0)
    cut_train = fractions["train"]
    cut_val = cut_train + fractions["val"]
    return np.where(u < cut_train, TRAIN, np.where(u < cut_val, VAL, TEST)).astype(np.int8)


def frozen_test_mask(ids: np.ndarray, split: np.ndarray, test_size: int, salt: int = 0) -> np.ndarray:
    """The frozen evaluation subset: the ``test_size`` test rows of lowest rank hash.

    It depends on the *set* of ids, not on their order or chunking. Appending
    rows only changes it if a new test id ranks below the current cut.
    """
    rank = id_hash(ids, salt, stream=1)
    is_test = np.asarray(split) == TEST
    n_test = int(is_test.sum())
    if n_test <= test_size:
        return is_test.copy()
    cut = np.partition(rank[is_test], test_size - 1)[test_size - 1]
    return is_test & (rank <= cut)
