"""The manual page qcowfs(1) and the bash completion, from the command line's
own parser (qcowfs.cli.main.build_parser) and the mount option table
(qcowfs.service.options.MOUNT_OPTIONS): a command or option added there is
in both the next time this runs.

    .venv/bin/python scripts/generate.py           write man/qcowfs.1 and completion/qcowfs.bash
    .venv/bin/python scripts/generate.py --check   exit 1 (saying which) if either is out of date

`make man` runs the first; tests/test_manpage.py the second. The page is made
by argparse-manpage (a test dependency: `make install` installs the
committed files and needs nothing of this). Its date is kept while the rest
of the page stays the same, so that regenerating changes nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcowfs import __version__  # noqa: E402
from qcowfs.cli.main import build_parser, command_parsers  # noqa: E402
from qcowfs.service.options import MOUNT_OPTIONS, ROOT_LOG_FILE  # noqa: E402

MAN_PAGE = ROOT / "man" / "qcowfs.1"
COMPLETION = ROOT / "completion" / "qcowfs.bash"


# ---- the manual page -----------------------------------------------------------------

def roff(text: str) -> str:
    """TEXT as roff running text: backslashes and hyphens escaped, no line
    starting with a control character."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def _tp(term: str, body: str) -> str:
    return f".TP\n{term}\n{roff(body)}"


def _sections() -> list[tuple[str, str]]:
    """What the parser does not say: the mount options one by one, the files
    of a mount, the files qcowfs uses, exit status, examples, see also."""
    opts = ["Given as \\fB\\-o\\fR \\fIOPT\\fR[,\\fIOPT\\fR...] to \\fBqcowfs mount\\fR, in the fourth "
            "field of /etc/fstab, or as \\fBOptions=\\fR of a systemd mount unit."]
    for o in MOUNT_OPTIONS:
        term = f"\\fB{roff(o.name)}\\fR" + (f"=\\fI{roff(o.value)}\\fR" if o.value else "")
        opts.append(_tp(term, o.help))
    opts.append(".PP\n" + roff("The generic options mount(8) and systemd pass (defaults, auto, noauto, nofail, _netdev, "
                     "dev, suid, atime and their no forms, x-systemd.*) are accepted and ignored; nosuid and "
                     "nodev always apply. Any other option is an error."))
    files = [
        ("disk.raw", "the virtual disk, byte for byte what qemu-img convert -O raw gives; writable on a "
                     "read-write or scratch mount. Loop-mount it with losetup --find --show."),
        ("snapshots/NAME.raw", "each internal snapshot's disk, read-only (id-ID.raw when NAME is not unique "
                               "or not usable as a file name)"),
        ("bitmaps/NAME", "each persistent dirty bitmap's bits, live while disk.raw is written"),
        ("partitions/N", "each MBR or GPT partition of disk.raw, with disk.raw's rights"),
        ("snapshot-partitions/NAME/N", "each partition of snapshots/NAME.raw"),
        ("maps/disk.json, maps/snapshots/NAME.json", "allocation maps, as qemu-img map --output=json"),
        ("maps/bitmaps/NAME.json", "a bitmap's dirty extents, as nbdinfo --map=qemu:dirty-bitmap:NAME --json"),
    ]
    tree = [roff("What a mount shows under MOUNTPOINT (details of snapshots, bitmaps and partitions are "
                 "in extended attributes: getfattr -d):")]
    tree += [_tp(f"\\fI{roff(name)}\\fR", what) for name, what in files]
    used = [
        ("/usr/local/bin/qcowfs", "the command, as make install links it (mount -t fuse.qcowfs runs it "
                                  "from there)"),
        ("/run/qcowfs, $XDG_RUNTIME_DIR/qcowfs, /tmp/qcowfs-UID",
         "the run directory (root's, then a user's): the daemon's pid file and control socket, named after "
         "the mount's device number. It must belong to the user and be writable by nobody else, or the "
         "mount is refused."),
        (f"{ROOT_LOG_FILE}, ~/.local/state/qcowfs/qcowfs.log",
         "the daemon's log when there is no syslog (root, others); -o log_file= chooses another"),
    ]
    exit_status = roff("0 on success. 1 when a command fails: one line on stderr says why. 2 for a usage "
                       "error (the command's usage is shown). qcowfs check exits as qemu-img check: 0 clean, "
                       "1 check failed, 2 corruptions found, 3 leaks only.")
    examples = [
        ("qcowfs mount vm.qcow2 /mnt/vm", "read-write; -r (or -o ro) for read-only, -o scratch for "
                                          "throwaway writes"),
        ("losetup --find --show /mnt/vm/partitions/1", "loop-mount a partition (or disk.raw)"),
        ("qcowfs snapshot create /mnt/vm monday", "a snapshot of the mounted disk, at one instant"),
        ("qcowfs checkpoint /mnt/vm tuesday", "snapshot + frozen bitmaps + a new bitmap: an incremental "
                                              "backup's point (see examples/backup.sh)"),
        ("qcowfs info /mnt/vm", "the mounted image as it is now (also check, map, snapshot list)"),
        ("qcowfs umount /mnt/vm", "flush everything, wait for the daemon to exit"),
        ("mount -t fuse.qcowfs vm.qcow2 /mnt/vm -o ro", "the same through mount(8) and /etc/fstab"),
    ]
    see_also = roff("qemu-img(1), mount.fuse3(8), fusermount3(1), losetup(8), fstrim(8), systemd.mount(5). "
                    "The README, docs/ and systemd/README.md of the qcowfs repository; the Python library: "
                    "docs/python.md.")
    return [
        ("MOUNT OPTIONS", "\n".join(opts)),
        ("FILES OF A MOUNT", "\n".join(tree)),
        ("FILES", "\n".join(_tp(f"\\fI{roff(name)}\\fR", what) for name, what in used)),
        ("EXIT STATUS", exit_status),
        ("EXAMPLES", "\n".join(_tp(f"\\fB{roff(cmd)}\\fR", what) for cmd, what in examples)),
        ("SEE ALSO", see_also),
    ]


def man_page(date: str) -> str:
    from argparse_manpage.manpage import Manpage

    parser = build_parser()
    page = Manpage(parser, _data={"project_name": "qcowfs", "version": __version__, "date": date,
                                  "manual_title": "User Commands",
                                  "description": "qcow2 disk images as plain files (FUSE)"},
                   format="single-commands-section")
    for heading, content in _sections():
        page.add_section(heading, "=", content)
    return str(page)


def _without_date(page: str) -> str:
    return re.sub(r'^(\.TH \S+ "\d+") "[^"]*"', r"\1", page, count=1, flags=re.M)


def current_man_page() -> str:
    """The page as it should be now: the committed page's date if nothing else changed."""
    today = dt.date.today().isoformat()
    new = man_page(today)
    if MAN_PAGE.exists():
        old = MAN_PAGE.read_text()
        if _without_date(old) == _without_date(new):
            return old
    return new


# ---- bash completion -------------------------------------------------------------------

def _kind(command: str, action: argparse.Action) -> str:
    """What a positional argument or an option's value is, for completion:
    choices:A|B, mounts (qcowfs mount points), dirs, images (image files and
    qcowfs mount points), files, or none (a name, a size)."""
    if action.choices:
        return "choices:" + "|".join(map(str, action.choices))
    dest, metavar = action.dest, str(action.metavar or "")
    if dest == "options" or metavar.startswith("OPT"):
        return "mountopts"
    if dest == "mountpoint":
        return "dirs" if command == "mount" else "mounts"
    if dest in ("image", "target"):
        return "images" if command != "mount" else "imagefiles"
    if metavar in ("NAME", "SOURCE", "SIZE", "SECONDS") or dest in ("name", "sources", "size", "granularity"):
        return "none"
    return "files"


def completion() -> str:
    parser = build_parser()
    commands = command_parsers(parser)
    top = [s for a in parser._actions for s in a.option_strings]
    lines = [
        "# bash completion for qcowfs: commands, options, mount options (-o), image files and the",
        "# mount points of qcowfs mounts. Generated by scripts/generate.py from the command line's",
        "# parser (do not edit); `make install` installs it where bash-completion finds it.",
        "",
        f"_qcowfs_commands='{' '.join(commands)}'",
        f"_qcowfs_top_options='{' '.join(top)}'",
        "_qcowfs_mount_options='" + " ".join(o.name + ("=" if o.value else "") for o in MOUNT_OPTIONS) + "'",
        "",
        "# _qcowfs_spec COMMAND: its options, the options that take a value (OPT=KIND), its positionals' kinds",
        "_qcowfs_spec() {",
        "    case $1 in",
    ]
    for name, sub in commands.items():
        flags = [s for a in sub._actions for s in a.option_strings]
        valued = [f"{s}={_kind(name, a)}" for a in sub._actions if a.option_strings and a.nargs != 0
                  for s in a.option_strings]
        positionals = [(_kind(name, a), a.nargs) for a in sub._actions if not a.option_strings]
        kinds = [k + ("+" if n in ("*", "+") else "") for k, n in positionals]
        lines.append(f"        {name}) _qcowfs_opts='{' '.join(flags)}' _qcowfs_valued='{' '.join(valued)}' "
                     f"_qcowfs_positionals='{' '.join(kinds)}' ;;")
    lines += [
        "        *) _qcowfs_opts='' _qcowfs_valued='' _qcowfs_positionals='' ;;",
        "    esac",
        "}",
        "",
        _BASH_BODY,
    ]
    return "\n".join(lines)


_BASH_BODY = r'''# The mount points of qcowfs mounts (/proc/mounts writes spaces and such as \NNN).
_qcowfs_mounts() {
    local _src mnt fstype _rest IFS=$' \t\n'
    while read -r _src mnt fstype _rest; do
        [ "$fstype" = fuse.qcowfs ] && printf '%b\n' "$mnt"
    done < /proc/mounts
}

# _qcowfs_complete_kind KIND CUR: fill COMPREPLY with what KIND may be.
_qcowfs_complete_kind() {
    local kind=$1 cur=$2 IFS=$'\n'
    case $kind in
        choices:*) IFS='|' read -r -a _words <<< "${kind#choices:}"
                   COMPREPLY=($(compgen -W "${_words[*]}" -- "$cur")) ;;
        mountopts) local head='' word
                   case $cur in *,*) head=${cur%,*},; cur=${cur##*,} ;; esac
                   COMPREPLY=($(IFS=' '; compgen -P "$head" -W "$_qcowfs_mount_options" -- "$cur"))
                   for word in "${COMPREPLY[@]}"; do
                       case $word in *=) compopt -o nospace 2>/dev/null ;; esac
                   done ;;
        mounts)    COMPREPLY=($(compgen -W "$(_qcowfs_mounts)" -- "$cur")) ;;
        dirs)      COMPREPLY=($(compgen -d -- "$cur")); compopt -o filenames 2>/dev/null ;;
        imagefiles|images)
                   COMPREPLY=($(compgen -f -X '!*.@(qcow2|qcow|img|QCOW2)' -- "$cur") $(compgen -d -- "$cur"))
                   [ "$kind" = images ] && COMPREPLY+=($(compgen -W "$(_qcowfs_mounts)" -- "$cur"))
                   compopt -o filenames 2>/dev/null ;;
        files)     COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null ;;
        *)         COMPREPLY=() ;;
    esac
}

_qcowfs() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local command='' i word n=0 skip=0 spec kind
    local _qcowfs_opts _qcowfs_valued _qcowfs_positionals
    shopt -s extglob
    COMPREPLY=()
    # bash splits `--opt=value` at the `=` (COMP_WORDBREAKS): the option is then
    # two words back, and `=` itself is no word of ours.
    if [ "$cur" = "=" ]; then cur='' prev=${COMP_WORDS[COMP_CWORD-1]}
    elif [ "$prev" = "=" ] && [ "$COMP_CWORD" -ge 2 ]; then prev=${COMP_WORDS[COMP_CWORD-2]}
    fi
    case $prev in -*) ;; *) prev='' ;; esac
    # The command, and how many positionals come before the word being completed.
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [ "$word" = "=" ]; then skip=1; continue; fi
        if [ "$skip" = 1 ]; then skip=0; continue; fi
        if [ -z "$command" ]; then
            case $word in -*) continue ;; esac
            command=$word
            _qcowfs_spec "$command"
            continue
        fi
        case $word in
            --*=*) ;;
            -*) case " $_qcowfs_valued " in *" $word="*) skip=1 ;; esac ;;
            *) n=$((n + 1)) ;;
        esac
    done
    if [ -z "$command" ]; then
        case $cur in
            -*) COMPREPLY=($(compgen -W "$_qcowfs_top_options" -- "$cur")) ;;
            *) COMPREPLY=($(compgen -W "$_qcowfs_commands" -- "$cur")) ;;
        esac
        return 0
    fi
    # The value of an option (the next word, or after =).
    if [ -n "$prev" ] && [[ " $_qcowfs_valued " == *" $prev="* ]]; then
        spec=" $_qcowfs_valued "; spec=${spec#*" $prev="}; kind=${spec%% *}
        _qcowfs_complete_kind "$kind" "$cur"
        return 0
    fi
    case $cur in
        --*=*) spec=" $_qcowfs_valued "; spec=${spec#*" ${cur%%=*}="}; kind=${spec%% *}
               _qcowfs_complete_kind "$kind" "${cur#*=}"
               COMPREPLY=("${COMPREPLY[@]/#/${cur%%=*}=}")
               return 0 ;;
        -*) COMPREPLY=($(compgen -W "$_qcowfs_opts" -- "$cur")); return 0 ;;
    esac
    # The next positional: its kind; a last one ending in + takes every word after it.
    local -a kinds=($_qcowfs_positionals)
    if [ "$n" -ge "${#kinds[@]}" ]; then
        kind=${kinds[${#kinds[@]}-1]:-none}
        case $kind in *+) ;; *) kind=none ;; esac
    else
        kind=${kinds[n]}
    fi
    _qcowfs_complete_kind "${kind%+}" "$cur"
}

complete -F _qcowfs qcowfs
'''


def main() -> int:
    check = sys.argv[1:] == ["--check"]
    wanted = {MAN_PAGE: current_man_page(), COMPLETION: completion()}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run `make man`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
