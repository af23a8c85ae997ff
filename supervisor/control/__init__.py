"""The control plane: HTTP over the unix socket, its routes and the views it serves."""
