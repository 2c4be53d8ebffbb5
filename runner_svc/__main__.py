"""`python -m runner_svc`: the runner service."""

from .main import main

raise SystemExit(main())
