"""``dgmrec-dgl dist-launch``: a DistDGL cluster on this machine, one graph server and one trainer per partition.

The shape of DGL's ``tools/launch.py`` on one host: partition i gets its own loopback address
``127.0.0.(i+1)`` (Linux routes all of 127.0.0.0/8 to ``lo``) and a free port, listed in an ip_config;
server i runs ``dgmrec-dgl train --dist-config P --ip-config F ...`` with ``DGL_ROLE=server`` and the
``DGL_*`` variables DGL's launcher sets; once every server listens, trainer i runs the same command with
``DGL_ROLE=client`` and ``torch.distributed``'s ``RANK=i`` / ``WORLD_SIZE=N`` (gloo, on 127.0.0.1).
Every process plays the machine of its partition (:func:`dgmrec_dgl._dgl.play_machine`, through the
variables it names; the shared-memory tag is unique to this launch).

Each process runs in a session of its own, with its output in a log file. The launcher waits for the
trainers, then for the servers (trainer 0 shuts them down). Whatever ends the launch (a process that
fails, a server that does not listen within ``server_timeout``, the overall ``timeout``, Ctrl-C or
SIGTERM), every process still running is killed with its session, the shared memory of this launch is
removed from ``/dev/shm``, and the cause is raised as one :class:`~dgmrec_dgl.errors.DataError` (exit 2):
the failing trainer's own error line when it printed one. On success the logs are removed and trainer
0's output (the metrics table) is returned.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ._dgl import HOST_PART_ENV, SHM_TAG_ENV
from .distributed import free_port, rank_threads
from .errors import DataError

__all__ = ["launch", "listening"]

POLL = 0.1                # seconds between looks at the processes
SERVER_GRACE = 60.0       # seconds the servers get to stop after the trainers ended


class _Stop(Exception):
    """Why the launch stops early: ``(path, field, problem, fix)`` of the DataError to raise."""


def listening(host: str, port: int) -> bool:
    """True when a socket listens on ``host:port`` (IPv4).

    Linux: the LISTEN entries of ``/proc/net/tcp`` (a closed server's port may still be in TIME_WAIT, so a
    bind there would fail without anything listening). Elsewhere: whether a bind there fails. Nothing
    connects to the port (a DGL server would take a connection for a client's).
    """
    if os.path.exists("/proc/net/tcp"):
        wanted = {f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}", f"00000000:{port:04X}"}
        with open("/proc/net/tcp") as fh:
            next(fh)
            return any(f[3] == "0A" and f[1] in wanted for f in (line.split() for line in fh))
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "")


def launch(part_config: str, parts: int, train_argv: list[str], *, threads: int = 0,
           server_timeout: float = 120.0, timeout: float = 0.0) -> str:
    """Run the servers and trainers of a ``parts``-partition config on this machine; returns trainer 0's output.

    Args:
        part_config: DGL's partition config ``<name>.json`` (checked by the caller).
        parts: its partition count.
        train_argv: ``dgmrec-dgl train`` options every server and trainer gets (``--config``, ``--out``, ...).
        threads: the run's ``train.threads`` (0: all cores), shared by the trainers.
        server_timeout: seconds within which every server must listen.
        timeout: seconds for the whole launch (0: no limit).

    Raises:
        DataError: the launch failed, timed out or was interrupted (every process it started has ended).
    """
    if parts > 254:
        raise DataError(part_config, "--parts", f"{parts} partitions do not fit in 127.0.0.1-127.0.0.254",
                        "run at most 254 partitions on one machine")
    part_config = os.path.abspath(part_config)
    box = tempfile.mkdtemp(prefix="dgmrec-dist-")
    # the shared-memory tag of this launch (a prefix may come from the environment, e.g. a test's own)
    tag = f"{os.environ.get(SHM_TAG_ENV, 'dgmrec')}{os.getpid()}x{int(time.time())}-"
    hosts = [f"127.0.0.{i + 1}" for i in range(parts)]
    ports = [free_port(host) for host in hosts]
    ip_config = os.path.join(box, "ip_config.txt")
    with open(ip_config, "w") as fh:
        fh.writelines(f"{host} {port}\n" for host, port in zip(hosts, ports))
    command = [sys.executable, "-m", "dgmrec_dgl.cli", "train", "--dist-config", part_config, "--ip-config",
               ip_config, *train_argv]
    common = {SHM_TAG_ENV: tag, "DGL_DIST_MODE": "distributed", "DGL_NUM_SERVER": "1",
              "DGL_IP_CONFIG": ip_config, "DGL_CONF_PATH": part_config, "PYTHONUNBUFFERED": "1"}
    trainer_threads = rank_threads(threads or os.cpu_count() or 1, parts)
    master = free_port("127.0.0.1")
    print(f"dist-launch: graph servers at {', '.join(f'{h}:{p}' for h, p in zip(hosts, ports))}, trainers' "
          f"torch.distributed group at 127.0.0.1:{master}; logs in {box}", flush=True)
    procs: list[tuple[str, subprocess.Popen, str]] = []
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    deadline = time.monotonic() + timeout if timeout else None
    try:
        try:
            for i in range(parts):
                procs.append(_start(f"server {i}", command, box, {
                    **common, HOST_PART_ENV: str(i), "DGL_ROLE": "server", "DGL_SERVER_ID": str(i),
                    "DGL_NUM_CLIENT": str(parts), "DGL_GRAPH_FORMAT": "csc", "OMP_NUM_THREADS": "1"}))
            _wait_for_servers(procs, hosts, ports, time.monotonic() + server_timeout, deadline, server_timeout)
            for i in range(parts):
                procs.append(_start(f"trainer {i}", command, box, {
                    **common, HOST_PART_ENV: str(i), "DGL_ROLE": "client", "DGL_NUM_SAMPLER": "0",
                    "RANK": str(i), "WORLD_SIZE": str(parts), "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": str(parts),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master),
                    "OMP_NUM_THREADS": str(trainer_threads)}))
            _wait_for_trainers(procs, deadline)
        except KeyboardInterrupt:
            raise _Stop(box, "dist-launch", "interrupted", "run the launch again") from None
    except _Stop as stop:
        raise DataError(*stop.args) from None
    finally:
        _end(procs, tag)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    with open(os.path.join(box, "trainer-0.out"), errors="replace") as fh:
        output = fh.read()
    shutil.rmtree(box, ignore_errors=True)
    return output


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _start(name: str, command: list[str], box: str, env: dict) -> tuple[str, subprocess.Popen, str]:
    stem = os.path.join(box, name.replace(" ", "-"))
    with open(stem + ".out", "w") as out, open(stem + ".log", "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
    return name, proc, stem + ".log"


def _failed(procs) -> None:
    """Stop on the first process that ended with a non-zero status."""
    for name, proc, log in procs:
        if proc.poll() not in (None, 0):
            line = _last_line(log)
            if line.startswith("error: ") and "; fix: " in line:
                path_field_problem, _, fix = line[len("error: "):].rpartition("; fix: ")
                raise _Stop(log, name, f"exited with status {proc.returncode}: {path_field_problem}", fix)
            raise _Stop(log, name, f"exited with status {proc.returncode}" + (f": {line}" if line else ""),
                        "see the log (the launch's other logs are beside it)")


def _check_deadline(deadline, box: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _Stop(box, "--timeout", "the launch did not finish in time", "raise --timeout, or 0 for no limit")


def _wait_for_servers(procs, hosts, ports, until: float, deadline, server_timeout: float) -> None:
    waiting = list(range(len(hosts)))
    while waiting:
        waiting = [i for i in waiting if not listening(hosts[i], ports[i])]
        if not waiting:
            return
        _failed(procs)
        for name, proc, log in procs:
            if proc.poll() == 0:
                raise _Stop(log, name, "ended before the trainers started", "see the log")
        if time.monotonic() > until:
            i = waiting[0]
            raise _Stop(procs[i][2], f"server {i}", f"did not listen on {hosts[i]}:{ports[i]} within "
                        f"{server_timeout:g} s", "raise --server-timeout (a large partition loads slowly), "
                        "or see the log")
        _check_deadline(deadline, os.path.dirname(procs[0][2]))
        time.sleep(POLL)


def _wait_for_trainers(procs, deadline) -> None:
    trainers = [p for p in procs if p[0].startswith("trainer")]
    servers = [p for p in procs if p[0].startswith("server")]
    box = os.path.dirname(procs[0][2])
    while any(proc.poll() is None for _, proc, _ in trainers):
        _failed(trainers)
        _failed(servers)
        _check_deadline(deadline, box)
        time.sleep(POLL)
    _failed(trainers)
    until = time.monotonic() + SERVER_GRACE
    while any(proc.poll() is None for _, proc, _ in servers):
        if time.monotonic() > until:
            raise _Stop(box, "servers", f"still running {SERVER_GRACE:g} s after the trainers ended",
                        "see the server logs")
        _check_deadline(deadline, box)
        time.sleep(POLL)
    _failed(servers)


def _end(procs, tag: str) -> None:
    """Kill every process still running (with its session), reap all, remove this launch's shared memory."""
    for _, proc, _ in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    for _, proc, _ in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    if os.path.isdir("/dev/shm"):
        for name in os.listdir("/dev/shm"):
            if name.startswith(tag):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join("/dev/shm", name))
