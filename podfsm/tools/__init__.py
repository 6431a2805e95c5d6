"""Tools that drive podfsm from outside the product: the benchmark (`bench.py`, with its CRI
load generator `loadgen.py`), the demo (`demo.py`), the chaos run (`chaos.py`) and the check
that a run left the host as found (`hostcare.py`). Unlike the faces they may use the drivers
directly (the bench measures them alone)."""
