"""`python -m vlsafe ...` = `vlsafe ...`."""
import sys

from vlsafe.commands import main

sys.exit(main())
