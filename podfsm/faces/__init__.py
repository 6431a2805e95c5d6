"""The faces of podfsm: the command line (cli), the HTTP shim and its web page (http), a client
of that shim over its unix socket (client) and the state diagrams (graph).

Each sits on top of the library's Controller API and adds no behaviour of its own to a sandbox.
"""
