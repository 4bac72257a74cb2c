"""`python -m transnormer_hf`: the same as the `transnormer-hf` command."""

import sys

from .cli import main

sys.exit(main())
