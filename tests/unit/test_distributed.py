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
    ],
)
def test_a_bad_address_is_exit_3_before_any_work(args):
    from imgembed.cli import catalog_commands, store_commands  # noqa: F401 - they register
    from imgembed.cli.app import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "--ray takes local, auto or a cluster address" in result.output
