"""``python -m diygpt`` (and ``torchrun -m diygpt``) runs the command-line tool."""

import sys

from diygpt.cli.main import main

sys.exit(main())
