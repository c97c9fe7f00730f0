"""Operations: the running process (server: listeners, admin, reload, drain, the wiring of
State, filters and engines) and systemd notifications (sdnotify)."""
