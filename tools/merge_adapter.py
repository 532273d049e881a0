#!/usr/bin/env python
"""`python tools/merge_adapter.py ARGS` = `vlsafe merge-adapter ARGS` (vlsafe/export/merge_adapter.py)."""
from vlsafe.export.merge_adapter import *  # noqa: F401,F403 (tests and scripts that load this file use its names)
from vlsafe.export.merge_adapter import main

if __name__ == "__main__":
    main()
