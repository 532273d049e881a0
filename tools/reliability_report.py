#!/usr/bin/env python
"""`python tools/reliability_report.py ARGS` = `vlsafe reliability-report ARGS` (vlsafe/tools/reliability_report.py)."""
import sys

from vlsafe.tools.reliability_report import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.reliability_report import main

if __name__ == "__main__":
    sys.exit(main())
