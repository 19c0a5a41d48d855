"""`ocrd run`: the loop, reload, backoff, the view guard, status, watcher, systemd, lock.

May import every room below it (ocrd.cycle and down). Its package imports
nothing, so `ocrd status` reads the status file without loading the loop.
"""
