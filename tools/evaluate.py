#!/usr/bin/env python
"""`python tools/evaluate.py ARGS` = `vlsafe evaluate ARGS` (vlsafe/tools/evaluate.py)."""
from vlsafe.tools.evaluate import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.evaluate import main

if __name__ == "__main__":
    main()
