"""Refcounts, in four parts with one seam each:

- `allocator`: the refcount table and blocks of a writable image, cluster
  allocation, table growth (`Allocator`);
- `transaction`: many refcount changes that take effect in one header write
  with the structures that need them (`Transaction`);
- `copied`: COPIED flags checked and made exact (`copied_errors`, `fix_copied`);
- `rebuild`: a new refcount structure from the references (`rebuild`).
"""
from .allocator import Allocator
from .copied import copied_errors, fix_copied, stored_refcount
from .rebuild import rebuild
from .transaction import Transaction

__all__ = ["Allocator", "Transaction", "copied_errors", "fix_copied", "stored_refcount", "rebuild"]
