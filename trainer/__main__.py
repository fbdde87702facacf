"""`python -m trainer` (what `torchrun -m trainer fit ...` runs)."""

import sys

from trainer.cli import main

sys.exit(main())
