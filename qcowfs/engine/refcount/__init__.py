"""Refcounts, in four parts with one seam each:

- `allocator`: the refcount table and blocks of a writable image, cluster
  allocation, table growth (`Allocator`);
- `transaction`: many refcount changes that take effect in one header write
  with the structures that need them (`Transaction`);
- `copied`: COPIED flags checked and made exact (`copied_errors`, `fix_copied`);
- `rebuild`: a new refcount structure from the references (`rebuild`).
"""
from .allocator import Allocator as Allocator, Release as Release
from .copied import copied_errors as copied_errors, fix_copied as fix_copied
from .copied import stored_refcount as stored_refcount
from .rebuild import rebuild as rebuild
from .transaction import Transaction as Transaction
