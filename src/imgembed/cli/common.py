"""What every command shares: the stderr console, options, and errors mapped to exit codes."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from imgembed.errors import (
    ConfigurationError,
    ImageError,
    ImgEmbedError,
    ModelUnavailableError,
    StoreError,
)

# Names, paths, product titles and messages are printed as they are: with rich's markup a
# "[/b]" in one was a MarkupError traceback, "[x]" vanished and ":m:" became an emoji.
err = Console(stderr=True, soft_wrap=True, emoji=False, markup=False)


def tables() -> Console:
    """stdout's console, made per table: a Console keeps the COLUMNS it saw when made, and a
    test runs many commands in one process with their own widths."""
    return Console(emoji=False, markup=False)


# The command group; app.py and the *_command(s).py modules add their commands to it.
app = typer.Typer(help="Exact CLIP image and text embeddings.", no_args_is_help=True)

# Exit codes, in one place: 1 = some inputs failed, 2 = usage (Typer's own).
EXIT_CODES: list[tuple[type[ImgEmbedError], int]] = [
    (ImageError, 1),  # the one input of a command (search --image) failed
    (ConfigurationError, 3),
    (ModelUnavailableError, 4),
    (StoreError, 6),
    (ImgEmbedError, 5),
]

ModelOpt = Annotated[str | None, typer.Option(help="open_clip model name or seed alias.")]
PretrainedOpt = Annotated[
    str | None, typer.Option(help="Pretrained tag or checkpoint file (.pt/.bin/.safetensors).")
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | auto.")]
RuntimeOpt = Annotated[
    str | None,
    typer.Option(
        callback=lambda value: _one_of(value, "torch", "onnx", "auto"),
        help="torch | onnx (exported once, then runs without torch) | auto (per CPU).",
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        callback=lambda value: _one_of(value, "fp32", "int8", "bf16", "fp16", "auto"),
        help="fp32 | int8 (onnx) | bf16 (torch) | fp16 (torch, CUDA) | auto (per CPU).",
    ),
]
BatchOpt = Annotated[int | None, typer.Option(min=1, help="Images or texts per encoder batch.")]


def _one_of(value: str | None, *choices: str) -> str | None:
    if value is not None and value not in choices:  # a usage error (2), not settings (3)
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
    return value


def _named(value: str | None) -> str | None:
    if value is not None and not value.strip():  # '' would fall back to the default one
        raise typer.BadParameter("a collection name cannot be empty")
    return value


CollectionOpt = Annotated[
    str | None,
    typer.Option("--collection", "-c", callback=_named, help="Collection name (default: images)."),
]


def _ray_address(value: str | None) -> str | None:
    """Checked as it is read: `index --ray photos/` took the folder for the address and then
    said only that the sources were missing."""
    from imgembed.config import check_ray_address

    if value is not None:
        try:
            check_ray_address(value)
        except ImgEmbedError as exc:
            raise fail(exc) from exc
    return value


RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        callback=_ray_address,
        metavar="[ADDRESS]",
        help="Run on Ray: alone (or 'local') a Ray started for this run, 'auto' the cluster "
        "running here, or a cluster's address (host:port, ray://host:10001). "
        "Needs imgembed\\[ray].",  # escaped: rich's markup took [ray] for a tag and dropped it
    ),
]
SourcesArg = Annotated[
    list[str], typer.Argument(help="Image files, folders (recursive) or http(s) URLs.")
]


def optional_value(argv: list[str], option: str, value: str) -> list[str]:
    """`option` given without a value (last, or before another option) gets `value`:
    `--ray` alone means `--ray local` (Typer has no options with optional values)."""
    out = []
    for i, token in enumerate(argv):
        out.append(token)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token == option and (following is None or following.startswith("-")):
            out.append(value)
    return out


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def waiting_line(what: str) -> str:
    """What a run waits for on the database (an index build, another session's turn)."""
    return f"⏳ {what[:1].upper()}{what[1:]} ..."


def make_service(**options: Any):
    from imgembed.service import ImageEmbeddingService

    return ImageEmbeddingService(**{k: v for k, v in options.items() if v is not None})


def make_settings(**options: Any):
    """The settings alone: no model, store or NumPy is loaded."""
    from imgembed.config import load_settings

    return load_settings(**{k: v for k, v in options.items() if v is not None})


def fail(exc: ImgEmbedError) -> typer.Exit:
    code = next(code for kind, code in EXIT_CODES if isinstance(exc, kind))
    err.print(f"error: {exc}", highlight=False)
    return typer.Exit(code)
