#!/usr/bin/env python
"""`python tools/precompute_reference.py ARGS` = `vlsafe precompute-reference ARGS` (vlsafe/tools/)."""
from vlsafe.tools.precompute_reference import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.precompute_reference import main

if __name__ == "__main__":
    main()
