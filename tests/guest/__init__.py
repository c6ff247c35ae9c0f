"""A QEMU guest for tests of vhost-user-blk and vduse-blk exports.

Not tests themselves: image.py builds and caches the guest's kernel and
initramfs, machine.py boots the guest and runs scripts in it (one guest per
pytest session: shared_guest), workload.py is the I/O the guest runs and the
model it is checked against, daemons.py the daemon parameters. See
docs/guest-tests.md.
"""
