#!/usr/bin/env python
"""`python tools/make_shards.py ARGS` = `vlsafe make-shards ARGS` (vlsafe/tools/make_shards.py)."""
from vlsafe.tools.make_shards import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.tools.make_shards import main

if __name__ == "__main__":
    main()
