"""`python -m prunelab.cli` = the `prunelab` command."""

import sys

from prunelab.cli import main

sys.exit(main())
