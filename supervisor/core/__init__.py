"""The sans-IO core: what the host decides and encodes, with no trio, no sockets, no Redis.

Message types (``messages``), JSON-RPC and typed values (``protocol``), the host⇄worker
frame codec (``frames``), the supervision decision (``policy``), config parsing
(``config``), discovery's metadata extraction (``discovery``), units, the FBP graph model
(``fbp_graph``) and the errors with their one JSON-RPC code table (``errors``). The trio
shell around it (``supervisor._*``) moves bytes and owns lifetimes; import-linter checks
in ``make test`` that nothing here imports the shell or an I/O library (pyproject.toml).
"""
