#!/usr/bin/env python
"""`python tools/guard.py ARGS` = `vlsafe guard ARGS` (vlsafe/tools/guard.py)."""
from vlsafe.tools.guard import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.guard import main

if __name__ == "__main__":
    main()
