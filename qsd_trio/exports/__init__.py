"""Block exports: the NBD server and exports (nbd/), FUSE (fuse.py), vhost-user-blk
(vhost_user_blk.py, over the virtio layer in virtio/).  Each registers its
type in base.EXPORT_TYPES; block-export-add looks it up there.
"""
