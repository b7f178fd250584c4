"""`python -m forge ...` is the `forge` command."""
import sys

from forge.cli import main

sys.exit(main())
