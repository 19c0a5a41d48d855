"""The names ocrd itself makes in the model dir; every one starts with `.ocrd-`.

A dot-entry is never a model (DESIGN §3), so none of these can collide with
one. They are pure values: where they are created, read and removed is up to
the shell (`ocrd.act` writes them, `ocrd.observe` reads them).
"""

from __future__ import annotations

OWN_PREFIX = ".ocrd-"  # every name ocrd itself makes in the model dir
TMP_PREFIX = OWN_PREFIX + "tmp-"  # a restore being copied in; rolled back after a crash
# A download of a required model, one name per model: kept across a restart while
# that model is still to be restored from the network (the next start resumes it).
DOWNLOAD_PREFIX = TMP_PREFIX + "dl-"
DELETING_PREFIX = OWN_PREFIX + "deleting-"  # a delete target out of its name (two-phase)
TRASH = OWN_PREFIX + "trash"  # the quarantine: one batch directory per cycle
LOCK = OWN_PREFIX + "lock"  # one ocrd per model dir
# One quarantine directory per cycle, `.ocrd-trash/<batch id>/`, holds the models
# moved there and this record of them (a dot-name: a model never has one).
RECORD = OWN_PREFIX + "record.json"
LEGACY_RECORD = "record.json"  # v1: one model per directory; still read
