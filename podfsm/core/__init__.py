"""The pure core of podfsm: the state table, the pod-config models and the records.

Nothing in this package touches the system: no files, no processes, no sockets. Everything here
can be tested directly and exhaustively.
"""
