"""Looking, never touching: the model dir's snapshot, pinned hashes, the trash, open handles.

Reads the model dir and /proc; writes nothing but ocrd's own state files
(the hash cache). May import ocrd.core.
"""
