"""`python -m jaxllm.conversions SOURCE DEST [--dtype] [--force]`."""

import sys

from jaxllm.conversions.cli import main

if __name__ == "__main__":
    sys.exit(main())
