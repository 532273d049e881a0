#!/usr/bin/env python
"""`python tools/report.py ARGS` = `vlsafe report ARGS` (vlsafe/tools/report.py)."""
import sys

from vlsafe.tools.report import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
