"""The command-line tools behind `vlsafe <command>` and `python tools/<name>.py` (one module per command)."""
