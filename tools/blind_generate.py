#!/usr/bin/env python
"""`python tools/blind_generate.py ARGS` = `vlsafe blind-generate ARGS` (vlsafe/tools/blind_generate.py)."""
from vlsafe.tools.blind_generate import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.blind_generate import main

if __name__ == "__main__":
    main()
