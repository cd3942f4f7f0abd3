"""`python -m imgembed ...` runs the `imgembed` command (where its script is not on PATH)."""

from imgembed.cli.app import main

if __name__ == "__main__":
    main()
