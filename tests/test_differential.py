"""A few cases of tests/differential.py in every run (make soak runs hundreds):
the offline commands against qemu-img on random chains. Seeds 1-60 found 17
mismatches on the code of 2026-12-06 before this file (qemu-img's snapshot
and bitmap spellings, a safe rebase that let the new base show through)."""
from __future__ import annotations

from pathlib import Path

import pytest

from differential import run_case


@pytest.mark.parametrize("seed", range(1, 25))
def test_commands_do_what_qemu_img_does(seed: int, tmp_path: Path) -> None:
    problems = run_case(seed, tmp_path / "case")
    assert not problems, "\n".join(problems)
