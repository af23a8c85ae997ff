"""The data entries: snapshots of databases and files, copies, and their restore steps."""
