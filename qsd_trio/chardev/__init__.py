"""chardev."""
