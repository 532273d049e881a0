#!/usr/bin/env python
"""`python tools/gpu_check.py ARGS` = `vlsafe gpu-check ARGS` (vlsafe/tools/gpu_check.py)."""
import sys

from vlsafe.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
