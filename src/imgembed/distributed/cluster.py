"""Which Ray a run uses, and what its workers may reach.

    address None or "local"  a Ray started on this machine for the run (num_cpus = the
                             settings' workers), stopped at the end
    "auto"                   the cluster already running here (`ray start --head`)
    "host:port", "ray://..." that cluster

A process that already runs Ray (ray.init was called) keeps using it. The workers get the
driver's settings, with the store made reachable: the embedded PostgreSQL listens on a unix
socket of this machine only, so it serves a Ray whose nodes all run here (its URL is passed
to them) and is refused for a cluster with other nodes."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from imgembed.config import Settings
from imgembed.config import check_ray_address as check_address
from imgembed.errors import ConfigurationError, ImgEmbedError
from imgembed.store import postgres_target

_RETRY_NOTE = "\nFailed to apply UDF transform after "


@contextmanager
def connect(address: str | None, settings: Settings) -> Iterator[None]:
    """Ray for one run (see the module's docstring)."""
    if ray.is_initialized():
        configure_data()
        yield
        return
    address = check_address(address)
    check_reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report usage
    # Ray's C++ parts log warnings for Ray's developers into the run's output (its files
    # under /tmp/ray keep them); the run reports its own failures, typed
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    options: dict = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address == "local":
        options.update(num_cpus=settings.workers, include_dashboard=False)
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ""
        if address not in ("local", "auto") and "RAY_AUTH_MODE" not in os.environ:
            hint = (  # measured on Ray 2.60: `auto` connects to such a head, an address not
                "; if the cluster uses Ray's token authentication, set RAY_AUTH_MODE=token "
                "here too, or use --ray auto on a node of it"
            )
        raise ConfigurationError(
            f"cannot connect to the Ray cluster at {address}: {exc}{hint}"
        ) from exc
    finally:
        # Ray's core worker puts its crash handler on SIGTERM (an abort, exit 134); the
        # CLI's own handler stops a run as Ctrl-C does, keeping what was stored.
        if callable(on_term) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
    configure_data()
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A cluster address that nothing answers on is refused in seconds (ray.init would wait
    for its GCS without end)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not 0 < int(port) < 65536:
        raise ConfigurationError(f"--ray {address}: {port} is not a port (1-65535)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (is `ray start "
            "--head` running there, and is the address its GCS or ray:// client port?)"
        ) from exc


def configure_data() -> None:
    """The driver shows its own progress (no Ray Data bars or per-run log lines), and a
    worker's typed error reaches it as itself, not wrapped in Ray's UserCodeException."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def all_nodes_here() -> bool:
    """Whether every live node of the cluster runs on this machine."""
    here = ray.util.get_node_ip_address()
    return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"])


def check_shared_store(settings: Settings) -> None:
    """Refuse, before Ray starts, a store that the workers' processes cannot share."""
    if settings.store == "qdrant" and not settings.qdrant_url:
        raise ConfigurationError(
            "Qdrant's local files serve one process at a time, and a Ray run writes from "
            "many: set IMGEMBED_QDRANT_URL to a Qdrant server or cluster"
        )


def worker_settings(settings: Settings) -> Settings:
    """The settings the workers run with: the driver's, with a store they can reach."""
    check_shared_store(settings)
    return settings if settings.store == "qdrant" else postgres_settings(settings)


def postgres_settings(settings: Settings) -> Settings:
    """The settings with a PostgreSQL the workers can reach (the catalogue always lives in
    PostgreSQL, whatever IMGEMBED_STORE says)."""
    if settings.database_url:
        return settings
    if not all_nodes_here():
        raise ConfigurationError(
            "the embedded PostgreSQL listens on a unix socket of this machine, which Ray "
            "workers on other hosts cannot reach: set IMGEMBED_DATABASE_URL to a PostgreSQL "
            "with pgvector that every node can reach (or run on a local Ray: --ray local)"
        )
    return settings.model_copy(update={"database_url": postgres_target(settings).url})


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def imgembed_error(exc: BaseException) -> ImgEmbedError | None:
    """The typed error a worker raised, from the exception Ray hands the driver."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # a RayTaskError: the worker's own exception
        if isinstance(cause, BaseException):
            current = cause
            continue
        if isinstance(current, ImgEmbedError):
            return _without_retry_note(current)
        current = current.__cause__ or current.__context__
    return None


def _without_retry_note(error: ImgEmbedError) -> ImgEmbedError:
    """Ray Data appends its retry advice to a failed task's message; ours says what to do."""
    message = error.args[0] if error.args else None
    if isinstance(message, str) and _RETRY_NOTE in message:
        error.args = (message.split(_RETRY_NOTE)[0], *error.args[1:])
    return error
