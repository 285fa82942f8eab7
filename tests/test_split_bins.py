from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snrmoe_dask.bins import cell_index, phys_bin, phys_bin_names, snr_bin, tertile_edges
from snrmoe_dask.split import TEST, TRAIN, VAL, assign_split, frozen_test_mask, id_hash

FRACS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_split_fractions_are_close_to_config():
    ids = np.arange(200_000)
    s = assign_split(ids, FRACS)
    assert abs((s == TRAIN).mean() - 0.8) < 0.005
    assert abs((s == VAL).mean() - 0.1) < 0.005
    assert abs((s == TEST).mean() - 0.1) < 0.005


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2**31), st.integers(1, 400))
def test_split_is_a_function_of_id_alone(n, offset, chunk):
    ids = np.arange(offset, offset + n, dtype=np.int64)
    whole = assign_split(ids, FRACS, salt=1)
    chunked = np.concatenate([assign_split(ids[i:i + chunk], FRACS, salt=1) for i in range(0, n, chunk)])
    perm = np.random.default_rng(0).permutation(n)
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_array_equal(whole[perm], assign_split(ids[perm], FRACS, salt=1))


def test_salt_changes_split_and_hash_is_uniform():
    ids = np.arange(50_000)
    assert (assign_split(ids, FRACS, 0) != assign_split(ids, FRACS, 1)).mean() > 0.1
    u = id_hash(ids)
    assert 0.0 <= u.min() and u.max() < 1.0
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 4500 and counts.max() < 5500


def test_frozen_test_subset_size_order_and_append():
    ids = np.arange(100_000)
    split = assign_split(ids, FRACS)
    frozen = frozen_test_mask(ids, split, 1000)
    assert frozen.sum() == 1000
    assert np.all(split[frozen] == TEST)
    perm = np.random.default_rng(1).permutation(ids.size)
    np.testing.assert_array_equal(frozen[perm], frozen_test_mask(ids[perm], split[perm], 1000))
    # fewer test rows than test_size: every test row is frozen
    small = frozen_test_mask(ids[:500], split[:500], 1000)
    np.testing.assert_array_equal(small, split[:500] == TEST)


def test_snr_bins_are_right_closed():
    edges = [2.0, 4.0, 7.0]
    snr = np.array([0.1, 2.0, 2.0001, 4.0, 4.5, 7.0, 7.0001, 50])
    np.testing.assert_array_equal(snr_bin(snr, edges), [0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="NaN"):
        snr_bin(np.array([1.0, np.nan]), edges)


def test_phys_bins_and_cells():
    teff = np.array([3600, 4500, 6000, 6000])
    mh = np.array([-2.0, 0.0, 0.5, -2.0])
    b = phys_bin(teff, mh, [4000, 5000], [-1.0, 0.0])
    np.testing.assert_array_equal(b, [0, 4, 8, 6])
    assert phys_bin_names([4000, 5000], [-1.0, 0.0])[4] == "T1_M1"
    np.testing.assert_array_equal(cell_index(b, [0, 1, 3, 2], 4), [0, 17, 35, 26])


def test_tertile_edges_equal_counts():
    x = np.random.default_rng(2).uniform(0, 1, 9000)
    e = tertile_edges(x)
    counts = np.bincount(np.searchsorted(e, x, side="left"))
    assert np.all(np.abs(counts - 3000) <= 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        tertile_edges(np.ones(100))


@pytest.mark.parametrize("p", [9, 10, 64])
def test_median_snr_bin_equals_the_bin_of_the_median_including_rows_split_at_an_edge(p):
    """Counting entries above each edge gives the bin of NumPy's median; rows with exactly half their entries
    above an edge (the median then averages across it) and entries equal to an edge take the exact path."""
    from snrmoe_dask.bins import median_snr_bin

    rng = np.random.default_rng(p)
    edges = (2.0, 4.0, 7.0)
    rows = [rng.uniform(0, 1.5, p), rng.normal(4.0, 0.01, p), np.full(p, 4.0), np.full(p, 7.0 + 1e-12)]
    for e in edges:  # half below, half above an edge, close and far
        for gap in (1e-9, 0.5, 3.0):
            rows.append(np.r_[np.full(p // 2, e - gap), np.full(p - p // 2, e + gap * rng.uniform(0.5, 2.0))])
    rows.append(np.r_[np.full(p // 2, 1.0), np.full(p - p // 2, 6.9)])  # the median 3.95 sits between edges
    ratio = np.array([rng.permutation(r) for r in rows] + list(rng.gamma(2.0, 2.0, (200, p))))
    expected = snr_bin(np.median(ratio, axis=1), edges)
    np.testing.assert_array_equal(median_snr_bin(ratio, edges), expected)
    assert len(set(expected.tolist())) == 4
