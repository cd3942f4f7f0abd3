"""`imgembed db start --for DURATION`: a small detached process that holds the embedded server
like any other user, so that the server stays up between commands (each would otherwise start
and stop it, ~0.4 s apiece), and lets go when the time is up or on SIGTERM (`db stop`); the
last user out then stops the server as usual.

    python -m imgembed.store.keeper DATA_DIR UNTIL_EPOCH_SECONDS"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from imgembed.store import embedded


def main(argv: list[str]) -> None:
    data_dir, until = Path(argv[0]), float(argv[1])
    # SIGTERM ends the sleep through SystemExit, so this process is taken off the server's
    # list of users (at exit) instead of vanishing from it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    embedded.start(data_dir)
    time.sleep(max(0.0, until - time.time()))


if __name__ == "__main__":
    main(sys.argv[1:])
