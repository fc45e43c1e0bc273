"""Numba kernels of dgmrec-dgl (no torch here), each with a pure-numpy twin used by the tests."""
