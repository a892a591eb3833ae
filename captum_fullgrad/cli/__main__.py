"""``python -m captum_fullgrad.cli``: the ``captum-fullgrad`` command line."""

import sys

from . import main

sys.exit(main())
