"""The `swapguard` command line."""
