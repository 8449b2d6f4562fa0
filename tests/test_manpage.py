"""The tool explains itself: `qcowfs --version`, `qcowfs COMMAND --help` for
every command (and a command's own usage for its bad options), the manual
page qcowfs(1) and the bash completion, both made from the parser by
scripts/generate.py and installed by `make install` (scripts/install.sh
--system): `man qcowfs` finds the page, bash-completion's loader finds the
completion, and TAB gives commands, options, mount options, image files and
the mount points of qcowfs mounts."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import QCOWFS, ROOT, mounted, qemu_img
from qcowfs.cli.main import build_parser, command_parsers
from qcowfs.service.options import MOUNT_OPTIONS, MountOptions

MAN_PAGE = ROOT / "man" / "qcowfs.1"
COMPLETION = ROOT / "completion" / "qcowfs.bash"
COMMANDS = command_parsers(build_parser())


def qcowfs(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, timeout=60)


def rendered(page: Path) -> str:
    """The page as man shows it, on one very wide line per paragraph (no hyphenation)."""
    p = subprocess.run(["man", "--warnings", "--nh", "--nj", "-l", str(page)], capture_output=True, text=True,
                       timeout=60, env={**{k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"},
                                        "MANWIDTH": "2000", "MANPAGER": "cat", "PAGER": "cat"})
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    return p.stdout


# ---- --version, --help and usage ------------------------------------------------------------

def test_version() -> None:
    p = qcowfs("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"qcowfs {version('qcowfs')}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_help_and_usage(command: str) -> None:
    """`qcowfs COMMAND --help` is that command's; a bad option of it prints that
    command's usage (not the top-level one) and exits 2."""
    p = qcowfs(command, "--help")
    assert p.returncode == 0 and p.stdout.startswith(f"usage: qcowfs {command} "), p.stdout[:200]
    args = [str(a.choices[0]) if a.choices else "x" for a in COMMANDS[command]._actions
            if not a.option_strings and a.nargs not in ("?", "*")]
    for a in COMMANDS[command]._actions:  # (options a command requires, as rebase's -b)
        if a.option_strings and a.required:
            args += [a.option_strings[0], "x"]
    p = qcowfs(command, *args, "--no-such-option")
    assert p.returncode == 2, p
    assert p.stderr.startswith(f"usage: qcowfs {command} "), p.stderr
    assert "unrecognized arguments: --no-such-option" in p.stderr and "Traceback" not in p.stderr


def test_mount_help_lists_every_mount_option() -> None:
    out = qcowfs("mount", "--help").stdout
    for o in MOUNT_OPTIONS:
        assert re.search(rf"^  {re.escape(o.name)}\b", out, re.M), o.name


# ---- the mount option table is every option there is -------------------------------------------

SAMPLES = {"USER": "0", "GROUP": "0", "OCTAL": "027", "SIZE": "256K", "PATH": "/tmp/x", "NAME": "cred",
           "DIR": "/tmp", "N": "2"}


def test_mount_option_table_is_what_apply_accepts() -> None:
    """Each documented option applies; each option name apply() knows is documented
    (its spellings with '-' and the ones libfuse passes back aside)."""
    for o in MOUNT_OPTIONS:
        MountOptions().apply(o.name + (f"={SAMPLES[o.value]}" if o.value else ""))
    source = (ROOT / "qcowfs" / "service" / "options.py").read_text()
    body = source[source.index("def apply"):source.index("def image_read_only")]
    known = set(re.findall(r'key == "([a-z0-9_]+)"', body))
    for group in re.findall(r"key in \(([^)]*)\)", body):
        known |= set(re.findall(r'"([a-z0-9_]+)"', group))
    known -= {"default_permissions", "fsname", "subtype", "noatime"}  # (noatime: a generic one)
    assert known == {o.name for o in MOUNT_OPTIONS}, known ^ {o.name for o in MOUNT_OPTIONS}


# ---- the manual page ----------------------------------------------------------------------------

def test_generated_files_are_up_to_date() -> None:
    """man/qcowfs.1 and completion/qcowfs.bash are what scripts/generate.py makes from
    the parser now (a command or option added without `make man` fails here)."""
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_man_page_agrees_with_the_parser() -> None:
    """Read as man shows it: every command with its usage, every option of every
    command, every mount option, and nothing named that the parser does not have."""
    text = rendered(MAN_PAGE)
    parser = build_parser()
    for a in parser._actions:  # (argparse-manpage leaves -h/--help out: every command has it)
        for s in a.option_strings if not isinstance(a, argparse._HelpAction) else []:
            assert s in text, s
    for name, sub in COMMANDS.items():
        usage = " ".join(sub.format_usage().split())
        assert usage.removeprefix("usage: ") in " ".join(text.split()), name
        for a in sub._actions:
            for s in a.option_strings if not isinstance(a, argparse._HelpAction) else []:
                assert re.search(rf"(^|[\s,\[]){re.escape(s)}\b", text, re.M), (name, s)
    section = text[text.index("MOUNT OPTIONS"):text.index("FILES OF A MOUNT")]
    for o in MOUNT_OPTIONS:
        assert re.search(rf"^\s+{re.escape(o.name)}{'=' + o.value if o.value else ''}\b", section, re.M), o.name
    listed = set(re.findall(r"^\s+qcowfs ([a-z-]+)$", text, re.M))
    assert listed == set(COMMANDS), listed ^ set(COMMANDS)


# ---- installed by `make install` ----------------------------------------------------------------

def test_install_puts_the_page_and_the_completion_where_they_are_found() -> None:
    """scripts/install.sh --system (what `make install` runs), into a scratch prefix:
    man finds qcowfs(1) there; bash-completion's loader finds the completion in
    PREFIX/share (XDG_DATA_DIRS, whose default has /usr/local/share); --uninstall
    takes both away."""
    if os.geteuid() != 0:
        pytest.skip("installs packages and files as root")
    prefix = Path(tempfile.mkdtemp(prefix="qcowfs-install-"))
    try:
        p = subprocess.run(["sh", str(ROOT / "scripts" / "install.sh"), "--system", "--prefix", str(prefix)],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        page = prefix / "share" / "man" / "man1" / "qcowfs.1"
        found = subprocess.run(["man", "-w", "qcowfs"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "MANPATH": str(prefix / "share" / "man")})
        assert found.stdout.strip() == str(page), found.stdout + found.stderr
        assert "MOUNT OPTIONS" in rendered(page)
        loader = ("source /usr/share/bash-completion/bash_completion; __load_completion qcowfs; "
                  "complete -p qcowfs")
        p = subprocess.run(["bash", "-c", loader], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "XDG_DATA_DIRS": f"{prefix / 'share'}:/usr/share"})
        assert p.stdout.strip() == "complete -F _qcowfs qcowfs", p.stdout + p.stderr
        subprocess.run(["sh", str(ROOT / "scripts" / "install.sh"), "--uninstall", "--prefix", str(prefix)],
                       check=True, capture_output=True, timeout=60)
        assert not page.exists() and not (prefix / "share/bash-completion/completions/qcowfs").exists()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


# ---- bash completion ----------------------------------------------------------------------------

CASES = r"""
source "$COMPLETION"
c() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _qcowfs
      local IFS=$'\t'; printf '%s\n' "${COMPREPLY[*]}"; }
c qcowfs ''
c qcowfs sn
c qcowfs mount --r
c qcowfs mount -o ro,sc
c qcowfs mount ''
c qcowfs mount a.qcow2 ''
c qcowfs umount ''
c qcowfs info ''
c qcowfs snapshot ''
c qcowfs map x.qcow2 --output ''
c qcowfs map x.qcow2 --output = j
"""


def test_bash_completion(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", work / "a.qcow2", "16M")
    (work / "notes.txt").write_text("not an image\n")
    with mounted(work / "a.qcow2", tmp_path / "mnt") as mnt:
        p = subprocess.run(["bash", "-c", CASES], capture_output=True, text=True, timeout=60, cwd=work,
                           env={**os.environ, "COMPLETION": str(COMPLETION)})
    assert p.returncode == 0 and not p.stderr, p.stderr
    # (words joined by tabs: a mount point of another test may hold spaces)
    got = p.stdout.split("\n")
    assert got[0].split("\t") == list(COMMANDS)
    assert got[1] == "snapshot"
    assert got[2] == "--read-only"
    assert got[3].split("\t") == ["ro,scratch", "ro,scratch_dir=", "ro,scratch_size="]
    assert sorted(got[4].split("\t")) == ["a.qcow2", "sub"]                    # image files, directories
    assert sorted(got[5].split("\t")) == ["sub"]                                # a mount point: directories
    assert str(mnt) in got[6].split("\t") and "/proc" not in got[6].split("\t")     # qcowfs mounts only
    # images and mount points (other tests running meanwhile may have qcowfs mounts too)
    assert {"a.qcow2", "sub", str(mnt)} <= set(got[7].split("\t"))
    assert all(w.startswith("/") for w in set(got[7].split("\t")) - {"a.qcow2", "sub"})
    assert got[8].split("\t") == ["create", "delete", "apply", "list"]
    assert got[9].split("\t") == ["human", "json"]
    assert got[10] == "json"
