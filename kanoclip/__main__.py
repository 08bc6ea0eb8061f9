"""``python -m kanoclip`` runs the CLI."""

import sys

from kanoclip.cli import main

sys.exit(main())
