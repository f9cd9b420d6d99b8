"""`python -m mta`: the same as the `mta` console script."""

import sys

from mta.cli import main

sys.exit(main())
