"""``python -m captum_fullgrad``: the ``captum-fullgrad`` command line."""

import sys

from .cli import main

sys.exit(main())
