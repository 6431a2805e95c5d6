"""Drivers: the only code that touches the system (namespaces, CNI, the OCI runtime, the store).

Each sits behind a small Protocol in podfsm.drivers.base, so the orchestrator can be tested with
fakes and the fakes can be checked against the real thing.
"""

import os

#: The directory of the podfsm package. The helper processes (the namespace workers, the
#: reaper) are started with it so they load podfsm's modules without running
#: podfsm/__init__.py, which imports the whole controller (see their `_BOOTSTRAP`s).
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
