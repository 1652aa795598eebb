"""`python -m minidepth ...` = the `minidepth` command."""

import sys

from .cli import main

sys.exit(main())
