"""``python -m splice.cli``."""

import sys

from . import main

sys.exit(main())
