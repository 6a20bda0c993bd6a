"""``python -m inti_adapters.train`` (what ``deepspeed --module`` and ``torchrun -m`` launch)."""

import sys

from .cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
