"""`serve --workers N`: /metrics sums the workers' files (prometheus_client's multiprocess
mode); the gauges are those of the live workers."""

import os
import subprocess
import sys

import pytest

from imgembed.errors import ConfigurationError

WORKER = """
import os
from imgembed.api.metrics import Metrics
metrics = Metrics()
metrics.watch(lambda: 7, lambda: 3, lambda status: 1)
metrics.render()  # its gauges written to its files
os._exit(0)  # killed (kill -9, out of memory): no close()
"""
SCRAPE = """
from imgembed.api.metrics import Metrics
metrics = Metrics()
metrics.watch(lambda: 0, lambda: 0, lambda status: 0)
print(metrics.render().decode())
metrics.close()
"""


def test_a_killed_workers_gauges_leave_the_sum(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, timeout=120)
    shown = subprocess.run(
        [sys.executable, "-c", SCRAPE], env=env, check=True, timeout=120, capture_output=True
    ).stdout.splitlines()
    assert b"imgembed_queue_depth 0.0" in shown, shown
    assert b'imgembed_jobs{status="running"} 0.0' in shown, shown


def test_serve_clears_the_metric_files_of_an_earlier_run(tmp_path, monkeypatch):
    """A user's PROMETHEUS_MULTIPROC_DIR is kept, but its counts added up across restarts."""
    from imgembed.cli.serve_command import _clear_metrics_folder

    for name in ("counter_11.db", "gauge_livesum_12.db", "histogram_11.db", "mine.db", "a.txt"):
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    _clear_metrics_folder()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "mine.db"]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "new" / "metrics"))
    _clear_metrics_folder()
    assert (tmp_path / "new" / "metrics").is_dir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "a.txt"))
    with pytest.raises(ConfigurationError, match="cannot use it for the metrics"):
        _clear_metrics_folder()


def test_serve_refuses_an_empty_metrics_folder(tmp_path, monkeypatch):
    """PROMETHEUS_MULTIPROC_DIR= (a script's "$DIR" unset): prometheus_client took it as set,
    wrote its files into the working folder, and every /metrics was a 500 (ValueError: not a
    directory), with one worker too."""
    from imgembed.cli.serve_command import _clear_metrics_folder

    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", empty)
        with pytest.raises(ConfigurationError, match="PROMETHEUS_MULTIPROC_DIR is set but empty"):
            _clear_metrics_folder()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    _clear_metrics_folder()  # not set: a temporary folder for several workers, none for one
