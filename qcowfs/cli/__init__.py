"""The `qcowfs` command (`qcowfs.cli.main`)."""
from .main import main

__all__ = ["main"]
