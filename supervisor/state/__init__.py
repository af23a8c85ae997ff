"""The state store (SQLite, in `state.dir`) and the lock that makes one supervisor per dir."""
