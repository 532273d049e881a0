#!/usr/bin/env python
"""`python tools/seed_spread.py ARGS` = `vlsafe seed-spread ARGS` (vlsafe/tools/seed_spread.py)."""
from vlsafe.tools.seed_spread import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.seed_spread import main

if __name__ == "__main__":
    main()
