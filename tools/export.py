#!/usr/bin/env python
"""`python tools/export.py ARGS` = `vlsafe export ARGS` (vlsafe/tools/export.py)."""
import sys

from vlsafe.tools.export import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
