"""Processes: spawning the host, its process tree and cgroup, pid checks, side jobs."""
