"""The pure core: the host and swap machines, their records, policies, wake-ups and backoff.

Events and the time go in, a new record and actions come out. Nothing here reads a clock, touches a
process, a file or a socket, or logs: `tests/test_layers.py` checks that no module in this folder
imports anything that could."""
