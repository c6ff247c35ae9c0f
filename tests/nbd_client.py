"""The client's side of the NBD wire format, for tests that speak raw NBD.

The encoders and decoders live in the codec (qsd_trio/proto/nbd.py), shared
with the NBD client driver; this module re-exports them under the names the
tests use (``from tests import nbd_client as C``).
"""

from __future__ import annotations

from qsd_trio.proto.nbd import (
    REPLY_MAGIC_SIZE,
    Reply,
    client_flags,
    encode_ext_request,
    encode_info_request,
    encode_meta_request,
    encode_option,
    encode_request,
    parse_block_status_chunk,
    parse_block_status_ext_chunk,
    parse_error_chunk,
    parse_option_reply_header,
    parse_reply_header,
    parse_server_greeting,
    reply_header_size,
)

__all__ = [
    "REPLY_MAGIC_SIZE", "Reply", "client_flags", "encode_ext_request", "encode_info_request",
    "encode_meta_request", "encode_option", "encode_request", "parse_block_status_chunk",
    "parse_block_status_ext_chunk", "parse_error_chunk", "parse_option_reply_header",
    "parse_reply_header", "parse_server_greeting", "reply_header_size",
]
