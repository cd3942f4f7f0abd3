"""Writing embeddings to stdout (JSON lines) or a file: .jsonl, .npy (+ .sources.txt), .parquet."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from imgembed.errors import ConfigurationError

FORMATS = (".jsonl", ".npy", ".parquet")


class Writer:
    """Takes rows {"source": str, "embedding": ndarray | None, ...}, one per input, in order.
    JSON lines keep every row (failures with their error); .npy keeps the embedded rows and
    names them, in order, in a `<file>.sources.txt` beside it; Parquet keeps every row."""

    def __init__(self, path: Path | None):
        self.path = path
        self.suffix = path.suffix.lower() if path else ".jsonl"
        if self.suffix not in FORMATS:
            raise ConfigurationError(f"unknown output format {self.suffix!r}; use one of {FORMATS}")
        self._rows: list[dict[str, Any]] = []
        self._stream: IO[str] | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self.suffix == ".jsonl":
            if self._stream is None:  # opened on first use: a failed start leaves no file
                self._stream = self.path.open("w", encoding="utf-8") if self.path else sys.stdout
            vector = row.get("embedding")
            out = {**row, "embedding": None if vector is None else vector.tolist()}
            self._stream.write(json.dumps(out, ensure_ascii=False) + "\n")
        else:
            self._rows.append(row)

    def close(self) -> None:
        if self.suffix == ".jsonl":
            if self._stream is not None:
                self._stream.flush()
                if self._stream is not sys.stdout:
                    self._stream.close()
        elif self.suffix == ".npy":
            self._write_npy()
        else:
            self._write_parquet()

    def _write_npy(self) -> None:
        assert self.path is not None
        done = [row for row in self._rows if row.get("embedding") is not None]
        dim = done[0]["embedding"].shape[0] if done else 0
        matrix = np.stack([row["embedding"] for row in done]) if done else np.empty((0, dim))
        np.save(self.path, matrix.astype(np.float32))
        sources = self.path.with_name(self.path.name + ".sources.txt")
        sources.write_text("".join(f"{row['source']}\n" for row in done), encoding="utf-8")

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert self.path is not None
        columns: dict[str, list[Any]] = {key: [] for row in self._rows for key in row}
        for row in self._rows:
            for key in columns:
                value = row.get(key)
                columns[key].append(value.tolist() if isinstance(value, np.ndarray) else value)
        table = pa.table(
            {
                key: pa.array(values, type=pa.list_(pa.float32()) if key == "embedding" else None)
                for key, values in columns.items()
            }
        )
        pq.write_table(table, self.path)
