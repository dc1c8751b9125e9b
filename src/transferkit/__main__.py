"""``python -m transferkit`` (also what ``torchrun -m transferkit fit ...`` runs)."""

import sys

from transferkit.cli.main import main

sys.exit(main())
