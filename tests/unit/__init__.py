"""The pure core only: no tmp_path, no processes; the whole folder runs in under a second."""
