"""qcowfs: qcow2 disk images as plain files, through FUSE."""

__version__ = "0.1.0"
