"""The real `ocrd` as a subprocess: the CLI, `ocrd run`, and ocrd under a real systemd."""
