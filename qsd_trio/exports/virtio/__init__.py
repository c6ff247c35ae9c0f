"""The virtio device side shared by the vhost-user-blk and VDUSE exports:
guest memory (memory.py), split virtqueues (virtqueue.py) and the
virtio-blk device (blk.py), with no transport I/O of their own."""
