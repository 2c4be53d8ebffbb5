"""`python -m scheduler_svc --config PATH`."""

import sys

from .main import main

sys.exit(main())
