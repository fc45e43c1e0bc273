"""The ascending argsort numpy's ``kind="quicksort"`` gave before its SIMD sorts, tie order included.

Why: the study drew its new items (``data/preprocess_new_items.py`` of the release) by sorting items on
their train count with ``pandas.DataFrame.sort_values`` (numpy's default quicksort on a float64 column)
and taking seeded random positions in that order. Equal counts are everywhere (a third of TikTok's items
have one or two train interactions), so which item sits at a drawn position depends on how the sort
orders ties. numpy's quicksort is not stable and, since numpy 1.25/2.0, dispatches to x86-simd-sort on
CPUs with AVX-512 or AVX2, whose tie order differs again; the classic introsort that numpy used before
(and still uses where no SIMD sort applies) reproduces the shipped TikTok split exactly
(``tests/test_new_items.py``).

:func:`introsort_argsort` follows that classic algorithm as numpy documents and ships it (``npysort``'s
``aquicksort``): partitions of more than 16 elements split around the median of their first, middle and
last entries with a Hoare scan that stops on keys equal to the pivot, the smaller side is sorted first
with the larger pushed on a stack; partitions of at most 16 are finished by insertion sort; a depth budget
of ``2 * floor(log2(n))`` partitions falls back to a heap sort (``aheapsort``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["introsort_argsort"]

#: partitions of at most this many elements + 1 are finished by insertion sort (numpy's SMALL_QUICKSORT)
_SMALL = 15


@numba.njit(cache=True)
def _sift_down(v, order, base, tmp, i, n):
    """Put ``tmp`` at position ``i`` of the max-heap ``order[base + 1 .. base + n]`` (by ``v``), moving the
    larger child up until ``tmp`` is not smaller than it (numpy's ``aheapsort`` inner loop)."""
    j = i << 1
    while j <= n:
        if j < n and v[order[base + j]] < v[order[base + j + 1]]:
            j += 1
        if v[tmp] < v[order[base + j]]:
            order[base + i] = order[base + j]
            i = j
            j += j
        else:
            break
    order[base + i] = tmp


@numba.njit(cache=True)
def _heap_argsort(v, order, lo, n):
    """Heap sort of ``order[lo:lo + n]`` by ``v`` (numpy's ``aheapsort``, 1-based heap)."""
    base = lo - 1
    for start in range(n >> 1, 0, -1):
        _sift_down(v, order, base, order[base + start], start, n)
    while n > 1:
        tmp = order[base + n]
        order[base + n] = order[base + 1]
        n -= 1
        _sift_down(v, order, base, tmp, 1, n)


@numba.njit(cache=True)
def _introsort(v):
    num = v.shape[0]
    order = np.arange(num)
    if num < 2:
        return order
    # stack of pending partitions (lo, hi, depth budget); the smaller side is always done first, so
    # the stack never holds more than log2(num) + 1 entries
    stack = np.empty((2 * 64, 3), dtype=np.int64)
    top = 0
    lo, hi = 0, num - 1
    depth = 2 * _floor_log2(num)
    while True:
        if depth < 0:
            _heap_argsort(v, order, lo, hi - lo + 1)
        else:
            while hi - lo > _SMALL:
                mid = lo + ((hi - lo) >> 1)
                if v[order[mid]] < v[order[lo]]:
                    order[mid], order[lo] = order[lo], order[mid]
                if v[order[hi]] < v[order[mid]]:
                    order[hi], order[mid] = order[mid], order[hi]
                if v[order[mid]] < v[order[lo]]:
                    order[mid], order[lo] = order[lo], order[mid]
                pivot = v[order[mid]]
                i = lo
                j = hi - 1
                order[mid], order[j] = order[j], order[mid]
                while True:
                    i += 1
                    while v[order[i]] < pivot:
                        i += 1
                    j -= 1
                    while pivot < v[order[j]]:
                        j -= 1
                    if i >= j:
                        break
                    order[i], order[j] = order[j], order[i]
                order[i], order[hi - 1] = order[hi - 1], order[i]
                depth -= 1
                if i - lo < hi - i:          # the larger side waits on the stack
                    stack[top, 0], stack[top, 1] = i + 1, hi
                    hi = i - 1
                else:
                    stack[top, 0], stack[top, 1] = lo, i - 1
                    lo = i + 1
                stack[top, 2] = depth
                top += 1
            for i in range(lo + 1, hi + 1):   # insertion sort of the small partition
                item = order[i]
                key = v[item]
                j = i
                while j > lo and key < v[order[j - 1]]:
                    order[j] = order[j - 1]
                    j -= 1
                order[j] = item
        if top == 0:
            break
        top -= 1
        lo, hi, depth = stack[top, 0], stack[top, 1], stack[top, 2]
    return order


@numba.njit(cache=True)
def _floor_log2(n):
    """floor(log2(n)) of a positive integer (numpy's ``npy_get_msb``)."""
    depth = 0
    while n > 1:
        n >>= 1
        depth += 1
    return depth


def introsort_argsort(values) -> np.ndarray:
    """Indices that sort ``values`` ascending, equal values in the order numpy's classic quicksort leaves.

    Parameters
    ----------
    values : ``[n]`` numbers (compared as float64, as pandas sorts a count column holding NaN before
        ``fillna``). NaN is refused.

    Returns
    -------
    ``[n]`` int64 permutation ``p`` with ``values[p]`` non-decreasing.
    """
    v = np.ascontiguousarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    if np.isnan(v).any():
        raise ValueError("values hold NaN, which this sort does not order")
    return _introsort(v)
