"""Runs the `imgembed` command in a process where importing torch fails, as on a machine
without it: `python tests/no_torch.py embed ...`. Exits 97 if torch got imported anyway."""

import atexit
import os
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r} (blocked by tests/no_torch.py)")


def _check() -> None:
    if any(name == "torch" or name.startswith("torch.") for name in sys.modules):
        os._exit(97)


if __name__ == "__main__":
    sys.meta_path.insert(0, _NoTorch())
    atexit.register(_check)
    from imgembed.cli.app import main

    sys.argv = ["imgembed", *sys.argv[1:]]
    main()
