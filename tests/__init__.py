"""ocrd's tests: a package, so helpers are imported as ``tests.support.*`` and never from
another test module. Shared fixtures are in ``conftest.py``, shared helpers in ``support/``.
"""
