"""`python -m pytest_kvperf ...` is the `kvperf` command."""

import sys

from .cli import main

sys.exit(main())
