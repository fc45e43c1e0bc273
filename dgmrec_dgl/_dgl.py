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


# ---------------------------------------------------------------------- DistDGL: several parts on one host
#: the environment variables that make a process one "machine" of a DistDGL cluster on one host
#: (``dgmrec-dgl dist-launch`` sets them on every graph server and trainer it starts; see :func:`play_machine`)
HOST_PART_ENV, SHM_TAG_ENV = "DGMREC_DGL_HOST_PART", "DGMREC_DGL_SHM_TAG"


def play_machine(part: int, shm_tag: str) -> None:
    """Make this process the machine of partition ``part`` when several parts share one host.

    DistDGL (``dgl.distributed``, 2.1) assumes one partition per machine and ties two things to that:

    * a trainer finds its machine id by matching the ip_config lines against the host's interface addresses
      (``rpc_client.get_local_machine_id``); on one host every trainer matches the first line and takes
      itself for machine 0, so all of them read part 0's data as local and create new tensors
      (``DistTensor``, ``DistEmbedding``, the sparse optimisers' states) on part 0's server only;
    * a graph server shares its partition's data with the trainers of its machine through ``/dev/shm``,
      under names that follow the tensor (``node~item~feat_image-kvdata-``), not the part, so two servers
      on one host write the same shared memory.

    This function replaces exactly two module attributes of DGL, in this process only: the machine-id
    lookup returns ``part``, and the key-value store's shared-memory names (``kvstore.empty_shared_mem``,
    which the servers use to create and the trainers to map a part's tensors) get the prefix
    ``shm_tag`` + ``p<part>-``. The graph structure is not shared at all in this mode: the servers run
    with ``disable_shared_mem=True`` and the trainers reach their own part's graph over loopback RPC, as
    DistDGL's trainers not co-located with a server do. ``tests/test_dist_train.py`` fails if DGL's code
    around these two attributes changes. On a cluster (one part per machine) nothing is replaced.
    """
    from dgl.distributed import kvstore, rpc_client

    if getattr(kvstore.empty_shared_mem, "_dgmrec_part", None) is not None:
        if kvstore.empty_shared_mem._dgmrec_part != (part, shm_tag):
            raise RuntimeError("this process already plays another machine")
        return
    create = kvstore.empty_shared_mem
    prefix = f"{shm_tag}p{int(part)}-"

    def tagged_shared_mem(name, is_create, shape, dtype="float32"):
        return create(prefix + name, is_create, shape, dtype)

    def machine_of_this_process(server_namebook):
        return int(part)

    tagged_shared_mem._dgmrec_part = (part, shm_tag)
    kvstore.empty_shared_mem = tagged_shared_mem
    rpc_client.get_local_machine_id = machine_of_this_process


def played_machine() -> tuple[int, str] | None:
    """``(part, shm tag)`` from the environment when this process plays one machine of a one-host cluster."""
    part = os.environ.get(HOST_PART_ENV)
    return None if part is None else (int(part), os.environ.get(SHM_TAG_ENV, "dgmrec-"))
