"""The one-module evaluations, serially in this process or on Ray (`--ray [ADDRESS]`).

Each Ray worker is an actor that builds its own `Probe` from the picklable `Setup` (loading the
model itself: nothing large crosses the wire) and runs `Probe.measure` for the jobs it is handed.
Every worker computes with one thread, so its numbers do not depend on how busy the machine
is; results come back in job order, so a Ray run returns what the serial run returns."""

from __future__ import annotations

from collections.abc import Callable

from slimport.analyze.sensitivity import Probe, Setup
from slimport.compress.quant.config import QuantArgs
from slimport.errors import SlimportError

Job = tuple[str, QuantArgs]
LOCAL = "local"  # --ray without an address: a local cluster of `workers` CPUs


def measure_serial(probe: Probe, jobs: list[Job], progress: Callable | None = None) -> list[dict]:
    rows = []
    for i, (name, args) in enumerate(jobs):
        rows.append(probe.measure(name, args))
        if progress:
            progress(i + 1, len(jobs), rows[-1])
    return rows


def connect(address: str, workers: int = 2):
    """ray, initialised: a local cluster of `workers` CPUs, or the cluster at `address`."""
    try:
        import ray
    except ImportError:
        raise SlimportError(
            "--ray needs Ray, which is not installed",
            hint="pip install 'slimport[ray]' (or pip install ray), or leave out --ray",
        ) from None
    if ray.is_initialized():
        return ray
    if address != LOCAL:
        _reachable(address)
    try:
        if address == LOCAL:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as e:  # ConnectionError, or Ray's own errors for a bad address
        raise SlimportError(
            f"--ray {address}: cannot connect to a Ray cluster ({' '.join(str(e).split())[:300]})",
            hint="give the head's address (ray://HOST:10001 or HOST:6379), or --ray alone for a "
            "local cluster",
        ) from None
    return ray


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to the head, tried first: `ray.init` retries an unreachable address for
    minutes before it fails."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto":
        return  # Ray's own lookup (RAY_ADDRESS, or a cluster started on this machine)
    if not host or not port.isdigit():
        raise SlimportError(f"--ray {address}: not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise SlimportError(
            f"--ray {address}: no Ray cluster answers there ({e})",
            hint="start one (ray start --head) or check the address; --ray alone runs a local one",
        ) from None


def measure_ray(
    setup: Setup, jobs: list[Job], address: str = LOCAL, workers: int = 2,
    progress: Callable | None = None,
) -> list[dict]:  # fmt: skip
    """`Probe.measure` of every job on Ray actors; rows in job order."""
    ray = connect(address, workers)
    from ray.util import ActorPool

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, setup: Setup) -> None:
            import dataclasses

            self.probe = Probe(dataclasses.replace(setup, threads=1))

        def measure(self, job: Job) -> dict:
            return self.probe.measure(*job)

    n = max(1, min(workers, len(jobs)))
    pool = ActorPool([Worker.remote(setup) for _ in range(n)])
    rows = []
    try:
        for i, row in enumerate(pool.map(lambda a, job: a.measure.remote(job), jobs)):
            rows.append(row)
            if progress:
                progress(i + 1, len(jobs), row)
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, SlimportError):
            raise SlimportError(cause.message, hint=cause.hint) from None
        raise
    return rows
