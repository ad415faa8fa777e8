"""One module per CLI command. Modules import only click at the top, so ``--help`` is instant."""
