"""isoboxd: one long-lived daemon for every container on the host.

holder.py   the tiny supervisor that keeps the /dev/fuse fd (and restarts the server)
server.py   the server: registration socket, FUSE loop threads, background samplers
client.py   what isobox-runc imports (lean): start the daemon if needed, register, unregister
fs/         the FUSE filesystem: protocol, node tree, one handler per emulated path
"""
