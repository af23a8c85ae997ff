"""swapguard: an external supervisor that owns the deadman clock of a host's code swaps."""

__version__ = "0.1.0"
