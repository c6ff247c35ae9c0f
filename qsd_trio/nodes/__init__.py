"""The block graph and its drivers.  See node.py for the API every user calls."""
