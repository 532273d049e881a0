#!/usr/bin/env python
"""`python tools/plan.py ARGS` = `vlsafe plan ARGS` (vlsafe/tools/plan.py)."""
import sys

from vlsafe.tools.plan import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.plan import main

if __name__ == "__main__":
    sys.exit(main())
