"""``python -m inti_adapters.train`` (what ``deepspeed --module`` and ``torchrun -m`` launch)."""

import sys

from .cli import train_main

sys.exit(train_main())
