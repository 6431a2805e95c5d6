"""Drivers: the only code that touches the system (namespaces, CNI, the OCI runtime, the store).

Each sits behind a small Protocol in podfsm.drivers.base, so the orchestrator can be tested with
fakes and the fakes can be checked against the real thing.
"""
