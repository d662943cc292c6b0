"""`python -m bigload` is the `bigload` command."""

import sys

from bigload.cli import main

sys.exit(main())
