"""Acting on a plan: the only room that renames, unlinks or removes (ruff TID251).

Quarantine and the trash's writer, restore, crash recovery, the handle check
around every delete, and apply(), which runs the engine cycle. May import
ocrd.core, ocrd.observe and ocrd.engine.
"""
