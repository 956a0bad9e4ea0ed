"""`python -m nanoseek.serve ...` is `nanoseek serve ...`."""

import sys

from .app import main

sys.exit(main())
