"""
Interoperability tests: the real server, started as C{twistd -n nbd}, driven
over 127.0.0.1 by external NBD clients (libnbd's tools and Python binding,
qemu) and by small raw-socket clients.
"""
