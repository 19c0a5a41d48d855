"""Faults, hostile input and SIGKILL crashes under the real ocrd."""
