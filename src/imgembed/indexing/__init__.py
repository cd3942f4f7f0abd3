"""Indexing: sources into a vector store collection, incrementally and resumably."""

from imgembed.indexing.run import IndexStats, index
from imgembed.indexing.sources import IndexItem, read_index_sources

__all__ = ["IndexItem", "IndexStats", "index", "read_index_sources"]
