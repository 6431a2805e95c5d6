"""`python -m podfsm`: the podfsm command line."""

import sys

from podfsm.faces.cli import main

sys.exit(main())
