"""Indexing: sources into a vector store collection, incrementally and resumably."""

from imgembed.indexing.run import IndexStats, index
from imgembed.indexing.sources import IndexItem, index_items, read_index_sources

__all__ = ["IndexItem", "IndexStats", "index", "index_items", "read_index_sources"]
