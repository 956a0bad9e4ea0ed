"""`python -m nanoseek` is the `nanoseek` command."""

import sys

from .cli import main

sys.exit(main())
