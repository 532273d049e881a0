#!/usr/bin/env python
"""`python tools/bench.py ARGS` = `vlsafe bench ARGS` (vlsafe/tools/bench.py)."""
import sys

from vlsafe.tools.bench import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
