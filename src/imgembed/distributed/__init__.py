"""Ray Data integration (the `ray` extra: `pip install imgembed[ray]`). Nothing else in
imgembed imports Ray; the CLI imports this package only for `--ray`.

    embed_dataset(ds, settings)   our decoding (tasks) and encoder (actor pool) mapped over
                                  your Ray Dataset of sources
    index(service, items, ...)    `imgembed index --ray`: the local run's semantics on Ray
    embed_store(catalog, ...)     `imgembed catalog embed --ray`

See cluster.py for which Ray a run uses and which stores its workers can reach."""

from __future__ import annotations

from imgembed.errors import ConfigurationError

try:
    import ray.data  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is installed in development
    raise ConfigurationError(
        "Ray is not installed: pip install 'imgembed[ray]' (or ray[data]>=2.40)"
    ) from exc

from imgembed.distributed.catalog import embed_store
from imgembed.distributed.cluster import check_address
from imgembed.distributed.indexing import index
from imgembed.distributed.stages import embed_dataset

__all__ = ["check_address", "embed_dataset", "embed_store", "index"]
