"""`imgembed serve`: the HTTP service on uvicorn."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from imgembed.cli.common import (
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    RuntimeOpt,
    app,
    fail,
    make_service,
)
from imgembed.errors import ConfigurationError, ImgEmbedError


def _address(value: str) -> str:
    if not value.strip():  # uvicorn would listen on every interface, IPv4 and IPv6
        raise typer.BadParameter("an address to listen on cannot be empty (0.0.0.0: all)")
    return value


@app.command()
def serve(
    host: Annotated[
        str,
        typer.Option(
            envvar="IMGEMBED_HOST", callback=_address, help="Address to listen on (0.0.0.0: all)."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="IMGEMBED_PORT", min=0, max=65535, help="TCP port.")
    ] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            envvar="IMGEMBED_WORKERS", min=1, help="Processes; each loads the model once."
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error.")] = "info",
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Serve the HTTP API and the search page (every other setting from IMGEMBED_* variables).
    SIGTERM stops accepting, finishes the requests in flight (those still running after
    IMGEMBED_SHUTDOWN_TIMEOUT seconds are answered 503), then exits."""
    import uvicorn

    from imgembed.api.inputs import server_settings
    from imgembed.api.logs import logging_config
    from imgembed.api.protocol import IdleTimeoutProtocol
    from imgembed.store import check_processes

    options = {"model": model, "pretrained": pretrained, "device": device, "runtime": runtime,
               "precision": precision}  # fmt: skip
    for name, value in options.items():  # worker processes read their settings from here
        if value is not None:
            os.environ[f"IMGEMBED_{name.upper()}"] = value
    try:
        _check_free(host, port)  # before the model loads: seconds, for a busy port
        _clear_metrics_folder()
        with make_service() as service:  # settings and model name checked before serving
            settings = server_settings(service.settings)
        check_processes(settings, workers)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    _more_open_files()
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down: a stop asked for and done is
    # exit 0, and at exit this process lets the embedded server go
    with contextlib.suppress(KeyboardInterrupt), _shared_metrics(workers):
        uvicorn.run(
            "imgembed.api:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=logging_config(log_level),
            log_level=log_level,
            access_log=False,  # our middleware logs each request as JSON, with its id
            http=IdleTimeoutProtocol,  # h11, with a deadline while no request is in service
            timeout_graceful_shutdown=settings.shutdown_timeout,
        )


@contextlib.contextmanager
def _shared_metrics(workers: int) -> Iterator[None]:
    """Several workers write their metrics to one folder and each /metrics sums them
    (prometheus_client's multiprocess mode): a temporary one, or the user's (see
    `_clear_metrics_folder`)."""
    if workers == 1 or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="imgembed-metrics-") as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # read by the workers as they start
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _clear_metrics_folder() -> None:
    """The folder a user names in PROMETHEUS_MULTIPROC_DIR is kept, made if missing; the
    metric files an earlier run left there go, or their counts would add up across runs."""
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if named is None:
        return
    if not named.strip():  # prometheus_client takes it as set: files in the working folder,
        # and the sum of the workers' files cannot be read (/metrics answered 500)
        raise ConfigurationError(
            "PROMETHEUS_MULTIPROC_DIR is set but empty: name a folder for the workers' "
            "metrics, or unset it"
        )
    try:
        os.makedirs(named, exist_ok=True)
        for old in Path(named).glob("*.db"):
            if old.name.startswith(("counter_", "gauge_", "histogram_", "summary_")):
                old.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"PROMETHEUS_MULTIPROC_DIR={named}: cannot use it for the metrics: "
            f"{exc.strerror or exc}"
        ) from exc


MAX_OPEN_FILES = 1 << 20  # Linux's usual ceiling (fs.nr_open) where the hard limit has none


def _more_open_files() -> None:
    """Each connection is a file: at the usual soft limit (1,024) a few idle clients made
    the server refuse everyone ("Too many open files"). The hard limit is ours to take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, MAX_OPEN_FILES) if hard != resource.RLIM_INFINITY else MAX_OPEN_FILES
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _check_free(host: str, port: int) -> None:
    """ConfigurationError if nothing can listen on host:port (bound as uvicorn binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            hint = (
                " (another server there? choose another --port)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise ConfigurationError(
                f"cannot listen on {host}:{port}: {exc.strerror}{hint}"
            ) from exc
