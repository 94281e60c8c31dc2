"""Operations beside the service: purge thread, memory watchdog, metrics, load timeline and timers."""
