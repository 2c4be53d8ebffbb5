"""`python -m gateway_svc --config PATH`. Guarded, with an absolute import: the archiver's worker
process (anyio.to_process) runs this file again as `__mp_main__`, where it must do nothing."""

import sys

from gateway_svc.main import main

if __name__ == "__main__":
    sys.exit(main())
