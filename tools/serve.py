#!/usr/bin/env python
"""`python tools/serve.py ARGS` = `vlsafe serve ARGS` (vlsafe/serving/cli.py)."""
from vlsafe.serving.cli import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.serving.cli import main

if __name__ == "__main__":
    main()
