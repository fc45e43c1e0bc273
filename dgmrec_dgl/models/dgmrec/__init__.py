"""DGMRec (SIGIR 2025): one module per paper concept; :mod:`.model` wires them together."""
