"""``python -m otfuse.cli``: the ``otfuse`` command."""

import sys

from otfuse.cli import main

sys.exit(main())
