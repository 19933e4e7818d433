"""`python -m nts` is the `ntsd` command."""

import sys

from .cli import main

sys.exit(main())
