"""The `qcowfs` command (`qcowfs.cli.main`)."""
from .main import main as main, run as run
