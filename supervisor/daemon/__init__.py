"""The running service: one event loop (`runtime`) that performs the core's actions."""
