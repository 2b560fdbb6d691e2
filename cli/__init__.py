"""mha_cli: the ``mha`` command (installed from the repository's cli/ folder)."""
