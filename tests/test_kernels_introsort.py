"""kernels.introsort: an ascending argsort with numpy's classic quicksort tie order (the release's new-item draw).

The tie order itself is checked against the study's shipped TikTok split (tests/test_new_items.py): that is
the only independent record of it. Here: it sorts, in every path (median-of-three partitions, insertion sort,
the heap-sort fallback), and the compiled kernel equals its Python source.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.introsort import _heap_argsort, _introsort, introsort_argsort


@settings(deadline=None, max_examples=80)
@given(st.integers(0, 2**32 - 1), st.integers(0, 3000), st.integers(1, 60))
def test_sorts_with_ties(seed, n, n_values):
    values = np.random.default_rng(seed).integers(0, n_values, size=n)
    order = introsort_argsort(values)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    assert np.all(np.diff(values[order]) >= 0)


def test_distinct_values_sort_as_numpy():
    values = np.random.default_rng(1).permutation(5000).astype(np.float64)
    np.testing.assert_array_equal(introsort_argsort(values), np.argsort(values))


def test_compiled_kernel_equals_its_python_source():
    values = np.random.default_rng(2).integers(0, 7, size=700).astype(np.float64)   # many ties, several levels
    np.testing.assert_array_equal(_introsort(values), _introsort.py_func(values))


@pytest.mark.parametrize("n", [1, 2, 17, 500])
def test_heap_sort_fallback_sorts_a_slice(n):
    values = np.random.default_rng(n).integers(0, 5, size=n + 6).astype(np.float64)
    order = np.arange(n + 6)
    _heap_argsort(values, order, 3, n)                 # only order[3:3 + n] is sorted
    assert np.array_equal(order[:3], [0, 1, 2]) and np.array_equal(order[3 + n:], np.arange(3 + n, n + 6))
    assert np.all(np.diff(values[order[3:3 + n]]) >= 0)


def test_nan_and_matrices_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        introsort_argsort([1.0, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        introsort_argsort(np.zeros((2, 2)))
