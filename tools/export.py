#!/usr/bin/env python
"""`python tools/export.py ARGS` = `vlsafe export ARGS` (vlsafe/export/cli.py)."""
import sys

from vlsafe.export.cli import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
