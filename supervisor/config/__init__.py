"""`swapguard.toml`: its schema, defaults, validation and the file `swapguard init` writes."""
