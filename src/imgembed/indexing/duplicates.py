"""Groups of near-duplicate images in a collection: each item's nearest neighbours above a
cosine threshold, joined transitively (union-find)."""

from __future__ import annotations

from imgembed.store.base import VectorStore

NEIGHBOURS = 10


def find_duplicates(
    store: VectorStore, collection: str, threshold: float = 0.95
) -> list[list[tuple[str, str]]]:
    """Groups of (id, source), largest first; items in a group sorted by id."""
    sources: dict[str, str] = {}
    parent: dict[str, str] = {}

    def root(item: str) -> str:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    ids = sorted(store.hashes(collection))
    for start in range(0, len(ids), 500):
        for record in store.get(collection, ids[start : start + 500]):
            sources[record.id] = record.source
            parent.setdefault(record.id, record.id)
            for hit in store.search(collection, record.vector, NEIGHBOURS):
                if hit.id != record.id and hit.score >= threshold:
                    parent.setdefault(hit.id, hit.id)
                    parent[root(hit.id)] = root(record.id)
    groups: dict[str, list[str]] = {}
    for item in parent:
        groups.setdefault(root(item), []).append(item)
    found = [sorted(group) for group in groups.values() if len(group) > 1]
    found.sort(key=lambda group: (-len(group), group[0]))
    return [[(item, sources.get(item, "")) for item in group] for group in found]
