"""Real tmp dirs, real processes, the real watchdog observer and notify socket."""
