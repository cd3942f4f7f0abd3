"""The Ray integration's edges without a cluster: Ray stays out of the core, `--ray` takes an
optional address, and a bad address is a configuration error before any work."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from imgembed.cli.common import optional_value
from imgembed.errors import ConfigurationError


def test_the_core_and_the_cli_never_import_ray():
    code = (
        "import sys, imgembed, imgembed.service, imgembed.catalog, imgembed.indexing; "
        "import imgembed.api.app, imgembed.cli.app; "
        "from imgembed.cli import catalog_commands, store_commands, serve_command; "
        "print([m for m in sys.modules if m == 'ray' or m.startswith('ray.')][:3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["index", "a/", "--ray"], ["index", "a/", "--ray", "local"]),
        (["index", "a/", "--ray", "-c", "x"], ["index", "a/", "--ray", "local", "-c", "x"]),
        (["index", "a/", "--ray", "auto"], ["index", "a/", "--ray", "auto"]),
        (["index", "a/", "--ray=h:6379"], ["index", "a/", "--ray=h:6379"]),
        (["index", "a/"], ["index", "a/"]),
    ],
)
def test_ray_alone_means_a_local_ray(argv, expected):
    assert optional_value(argv, "--ray", "local") == expected


def test_cluster_addresses():
    from imgembed.distributed import check_address

    assert check_address(None) == check_address("local") == "local"
    for address in ("auto", "10.0.0.5:6379", "head.internal:6379", "ray://head:10001"):
        assert check_address(address) == address
    with pytest.raises(ConfigurationError, match="put --ray after the sources"):
        check_address("photos/")


@pytest.mark.parametrize(
    "args",
    [
        ["index", "photos/", "-c", "x", "--ray", "photos/"],
        ["catalog", "embed", "--store-id", "s", "--ray", "photos/"],
        # the one source taken for the address: was exit 2, "Missing argument 'SOURCES...'"
        ["index", "--ray", "photos/"],
    ],
)
def test_a_bad_address_is_exit_3_before_any_work(args):
    from imgembed.cli import catalog_commands, store_commands  # noqa: F401 - they register
    from imgembed.cli.app import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "--ray takes local, auto or a cluster address" in result.output


def test_an_address_nothing_answers_on_is_refused_in_seconds():
    """ray.init waited without end for a GCS at an address nobody listens on."""
    import socket

    from imgembed.distributed.cluster import check_reachable

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(
        ConfigurationError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"
    ):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(ConfigurationError, match="99999 is not a port"):
        check_reachable("bogus:99999")
    with socket.socket() as server:  # one that answers passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"ray://127.0.0.1:{server.getsockname()[1]}")
    check_reachable("auto")


def test_a_local_qdrant_is_refused_before_ray_starts(monkeypatch, tmp_path):
    import types

    import ray

    from imgembed.config import load_settings
    from imgembed.distributed import index

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    service = types.SimpleNamespace(settings=load_settings(store="qdrant", data_dir=tmp_path))
    with pytest.raises(ConfigurationError, match="Qdrant's local files serve one process"):
        index(service, [], "x", address="local")


def test_encoder_actors_that_would_leave_no_cpu_to_decode_are_refused(monkeypatch):
    """IMGEMBED_RAY_ACTORS=2 on a 2-CPU cluster waited for ever at 0/N, without a word."""
    from imgembed.config import load_settings
    from imgembed.distributed import cluster, stages

    monkeypatch.setattr(cluster, "cluster_cpus", lambda: 2)
    assert stages.encoder_actors(load_settings()) == 1  # half the CPUs
    for given, room in (({"ray_actors": 2}, "at most 1 actor"), ({"ray_actor_cpus": 4}, "lower")):
        with pytest.raises(ConfigurationError, match=f"leaving none to read.*{room}"):
            stages.encoder_actors(load_settings(**given))
    monkeypatch.setattr(cluster, "cluster_cpus", lambda: 8)
    assert stages.encoder_actors(load_settings(ray_actors=3, ray_actor_cpus=2)) == 3
