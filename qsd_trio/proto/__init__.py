"""Sans-I/O codecs over bytes: NBD, the kernel FUSE protocol, vhost-user
messages.  No sockets and no trio here, so every message is tested on bytes
alone; exports/ does the I/O.
"""
