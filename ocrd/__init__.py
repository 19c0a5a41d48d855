"""ocrd: keep a model directory converged with a YAML policy."""

__version__ = "0.1.0"
