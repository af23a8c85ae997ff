"""The code tree: git checkpoints and restores, and the watcher that sees edits."""
