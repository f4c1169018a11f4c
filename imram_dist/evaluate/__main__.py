"""python -m imram_dist.evaluate"""

import sys

from imram_dist.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
