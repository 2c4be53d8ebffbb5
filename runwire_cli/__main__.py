"""`python -m runwire_cli ...` is `runwire ...`."""

import sys

from .cli import main

sys.exit(main())
