"""Helpers the tests share: a daemon under test, the CLI, policies, files, processes.

Test modules import these (``from tests.support.daemon import Daemon``), never each other
or conftest.py; the fixtures built on them are in tests/conftest.py.
"""
