"""The package's single import point for DGL.

``dgl==2.1.0`` (the only DGL built for Python 3.11) imports its GraphBolt sub-package eagerly, and
GraphBolt loads a C++ library compiled per torch release (``libgraphbolt_pytorch_<version>.so``, shipped
for torch <= 2.2). With torch 2.13 that library does not exist and ``import dgl`` fails, although the
graph kernels this project uses (heterographs, ``update_all``, ``u_mul_e``, autograd through SpMM) work.

:func:`import_dgl` checks for the binary that matches the running torch. When it is present, DGL is
imported untouched. When it is missing, a stand-in ``dgl.graphbolt`` module is registered first, so
that DGL's ``__init__`` skips the real one; touching any attribute of the stand-in raises an
``ImportError`` that says why. Everything else in the package does ``from dgmrec_dgl._dgl import dgl``.

DistDGL's server mode (``dgl.distributed``, ``use_graphbolt=False``) does not use GraphBolt but asks, when
a server loads its partition (``dist_graph._format_partition``), whether the graph is a
``gb.FusedCSCSamplingGraph``. For that check the stand-in carries the class names DGL tests against
(:data:`GRAPHBOLT_TYPES`) as placeholder classes that nothing is an instance of, so the answer is False and
a DGL graph is served; creating one raises the same ``ImportError``. ``tests/test_distdgl.py`` starts a
real ``DistGraphServer`` on loopback to keep this true.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

__all__ = ["GRAPHBOLT_TYPES", "dgl", "fn", "graphbolt_available", "import_dgl"]

#: GraphBolt classes that DGL code outside GraphBolt tests graphs against with ``isinstance``
#: (``dgl/distributed/dist_graph.py``: ``_format_partition``; ``graph_services.py`` too, but only when
#: ``use_graphbolt=True``, which the stand-in cannot serve).
GRAPHBOLT_TYPES = ("FusedCSCSamplingGraph",)


def _graphbolt_binary(dgl_dir: str) -> str:
    version = torch.__version__.split("+")[0]
    return os.path.join(dgl_dir, "graphbolt", f"libgraphbolt_pytorch_{version}.so")


def _unavailable(binary: str) -> ImportError:
    return ImportError(f"dgl.graphbolt is unavailable: {binary} does not exist for torch {torch.__version__}; "
                       "dgmrec-dgl does not use GraphBolt (it needs torch <= 2.2)")


def _placeholder_type(name: str, binary: str) -> type:
    """A class named ``name`` that cannot be instantiated: ``isinstance(x, it)`` is False for every ``x``."""

    def refuse(cls, *args, **kwargs):
        raise _unavailable(binary)

    return type(name, (), {"__new__": refuse, "__module__": "dgl.graphbolt",
                           "__doc__": f"Stand-in for GraphBolt's {name}: nothing is an instance of it."})


class _MissingGraphBolt(types.ModuleType):
    """Stand-in for ``dgl.graphbolt`` when no binary matches the installed torch."""

    def __init__(self, binary: str):
        super().__init__("dgl.graphbolt")
        self.__path__ = []  # a package, so ``import dgl.graphbolt.x`` fails cleanly
        self._binary = binary
        for name in GRAPHBOLT_TYPES:
            setattr(self, name, _placeholder_type(name, binary))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _unavailable(self._binary)


def import_dgl():
    """Import DGL, registering a GraphBolt stand-in only when its binary is missing.

    Returns:
        the ``dgl`` module.

    Raises:
        ImportError: DGL is not installed, or a dependency it needs (``pandas``) is missing.
    """
    if "dgl" in sys.modules:
        return sys.modules["dgl"]
    spec = importlib.util.find_spec("dgl")
    if spec is None or spec.origin is None:
        raise ImportError("dgl is not installed: run `pip install dgl==2.1.0` (see setup.cfg)")
    binary = _graphbolt_binary(os.path.dirname(spec.origin))
    if not os.path.exists(binary) and "dgl.graphbolt" not in sys.modules:
        sys.modules["dgl.graphbolt"] = _MissingGraphBolt(binary)
    try:
        import pandas  # noqa: F401  (dgl needs it and does not declare it)
    except ImportError as exc:  # pragma: no cover - install problem
        raise ImportError("dgl needs pandas, which it does not declare: run `pip install pandas`") from exc
    import dgl as _dgl

    return _dgl


def graphbolt_available() -> bool:
    """True when the real GraphBolt was imported (its binary matched the running torch)."""
    import_dgl()
    return not isinstance(sys.modules.get("dgl.graphbolt"), _MissingGraphBolt)


dgl = import_dgl()
fn = dgl.function
