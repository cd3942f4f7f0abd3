"""Writing embeddings to stdout (JSON lines) or a file: .jsonl, .npy (+ .sources.txt), .parquet.

The file is checked before any work (a missing or read-only folder is a ConfigurationError
at once, not after an hour of embedding), written beside its place under a temporary name and
put in place when complete: a failed or stopped run leaves no half file and keeps the last
good one. Text is written as UTF-8: a file name that is not
valid UTF-8 is written with `\\xNN` for each undecodable byte (imgembed/names.py; `restore`
gives the name back)."""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from imgembed.errors import ConfigurationError, OutputError
from imgembed.names import printable

FORMATS = (".jsonl", ".npy", ".parquet")


def check_writable(path: Path, what: str = "output") -> None:
    """A ConfigurationError now if `path` cannot be written later (nothing is left behind)."""
    shown = printable(str(path))
    folder = path.parent
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):  # said below
        pass
    except OSError as exc:  # a name too long for the file system (ENAMETOOLONG), a loop
        raise ConfigurationError(f"cannot write the {what} {shown}: {exc.strerror or exc}") from exc
    if path.is_dir():
        raise ConfigurationError(f"cannot write the {what} {shown}: it is a folder")
    if folder.exists() and not folder.is_dir():
        raise ConfigurationError(
            f"cannot write the {what} {shown}: {printable(str(folder))} is a file, not a folder"
        )
    if not folder.is_dir():
        raise ConfigurationError(
            f"cannot write the {what} {shown}: the folder {printable(str(folder))} does not "
            "exist (create it first)"
        )
    try:  # where the file is made under a temporary name, then renamed into place
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigurationError(f"cannot write the {what} {shown}: {exc.strerror or exc}") from exc


class Writer:
    """Takes rows {"source": str, "embedding": ndarray | None, ...}, one per input, in order.
    JSON lines keep every row (failures with their error); .npy keeps the embedded rows and
    names them, in order, in a `<file>.sources.txt` beside it; Parquet keeps every row."""

    def __init__(self, path: Path | None):
        self.path = path
        self.suffix = path.suffix.lower() if path else ".jsonl"
        if self.suffix not in FORMATS:
            raise ConfigurationError(f"unknown output format {self.suffix!r}; use one of {FORMATS}")
        if path is not None:
            check_writable(path)
        self._rows: list[dict[str, Any]] = []
        self._stream: IO[str] | None = None
        self._staged: dict[Path, Path] = {}  # final name -> the temporary one written

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None:  # failed or stopped: the files as they were
            self.discard()

    def write(self, row: dict[str, Any]) -> None:
        row = {key: printable(v) if isinstance(v, str) else v for key, v in row.items()}
        if self.suffix == ".jsonl":
            vector = row.get("embedding")
            out = {**row, "embedding": None if vector is None else vector.tolist()}
            with self._errors(self.path):
                if self._stream is None:  # opened on first use: a failed start leaves no file
                    self._stream = self._open()
                self._stream.write(json.dumps(out, ensure_ascii=False) + "\n")
        else:
            self._rows.append(row)

    def close(self, dimension: int) -> None:
        """Write what is kept and put it in place; `dimension` shapes an .npy with no embedded
        row (0, dimension)."""
        if self.suffix == ".jsonl":
            with self._errors(self.path):
                if self._stream is not None:
                    self._stream.flush()
                    if self._stream is not sys.stdout:
                        self._stream.close()
        elif self.suffix == ".npy":
            self._write_npy(dimension)
        else:
            self._write_parquet()
        for final, temp in self._staged.items():
            with self._errors(final):
                temp.replace(final)
        self._staged.clear()

    def discard(self) -> None:
        """Drop what was written so far (the files stay as they were)."""
        if self._stream is not None and self._stream is not sys.stdout:
            with suppress(OSError):
                self._stream.close()
        for temp in self._staged.values():
            with suppress(OSError):
                temp.unlink(missing_ok=True)
        self._staged.clear()

    def _open(self) -> IO[str]:
        return self._temp(self.path).open("w", encoding="utf-8") if self.path else sys.stdout

    def _temp(self, final: Path) -> Path:
        self._staged[final] = final.with_name(f".{final.name}.{os.getpid()}.part")
        return self._staged[final]

    @contextmanager
    def _errors(self, path: Path | None) -> Iterator[None]:
        """OSError while writing `path` (disk full, folder removed meanwhile) -> OutputError
        naming it; nothing half written is left."""
        try:
            yield
        except OSError as exc:
            if path is None and exc.errno == errno.EPIPE:
                raise  # the reader stopped (`| head`): the CLI ends quietly with 1
            self.discard()
            where = printable(str(path)) if path else "the output"  # as every command says
            raise OutputError(f"cannot write {where}: {exc.strerror or exc}") from exc

    def _write_npy(self, dimension: int) -> None:
        import numpy as np

        assert self.path is not None
        done = [row for row in self._rows if row.get("embedding") is not None]
        matrix = np.stack([row["embedding"] for row in done]) if done else np.empty((0, dimension))
        with self._errors(self.path), self._temp(self.path).open("wb") as file:
            np.save(file, matrix.astype(np.float32))
        sources = self.path.with_name(self.path.name + ".sources.txt")
        # one line per row: a line break inside a name would shift every later row
        lines = (row["source"].replace("\n", "\\n").replace("\r", "\\r") for row in done)
        with self._errors(sources):
            self._temp(sources).write_text("".join(f"{line}\n" for line in lines), "utf-8")

    def _write_parquet(self) -> None:
        import numpy as np
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
        with self._errors(self.path):
            pq.write_table(table, self._temp(self.path))
