"""Write the man pages and bash completions of the console scripts from their click commands.

Run at package build time with the built tree on PYTHONPATH:
    python3 packaging/gen_docs.py OUTDIR
writes OUTDIR/man1/<name>.1 and OUTDIR/bash-completion/<name>. The packages
build-depend on the runtime libraries the commands import. The completion is
static (no call back into the program), so it works with any click the target
ships.
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

# name: (module, click command, the man page's NAME line)
COMMANDS = {
    "kvmhook": ("kvmhook.cli", "main", "operate the kvmhook agent package on a KVM host"),
    "keystore-setup": (
        "keystore.cli",
        "setup_command",
        "create the agent's keystore and key and write a CSR for this host",
    ),
    "keystore-cert-import": (
        "keystore.cli",
        "import_command",
        "install a CA-signed certificate into the agent's keystore and libvirt's TLS files",
    ),
}


def load(module: str, attribute: str) -> click.Command:
    """The click command `attribute` of `module`."""
    return getattr(importlib.import_module(module), attribute)


def walk(
    command: click.Command, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every (path, command) of the tree, depth first."""
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if not getattr(sub, "hidden", False):
                yield from walk(sub, (*path, name))


def roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def help_text(command: click.Command, path: tuple[str, ...]) -> str:
    """click's own --help of one command, unwrapped from the terminal width."""
    with click.Context(command, info_name=" ".join(path), terminal_width=78) as ctx:
        return command.get_help(ctx)


def man_page(name: str, command: click.Command, summary: str, version: str) -> str:
    """A section 1 man page: NAME, SYNOPSIS, and every command's --help."""
    date = datetime.datetime.fromtimestamp(
        int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or datetime.datetime.now().timestamp(),
        tz=datetime.timezone.utc,
    ).strftime("%Y-%m-%d")
    out = [
        f'.TH "{name.upper()}" 1 "{date}" "kvmhook {version}" "User Commands"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(summary)}",
        ".SH SYNOPSIS",
    ]
    tree = list(walk(command, (name,)))
    for path, sub in tree:
        if not isinstance(sub, click.Group) or path == (name,):
            with click.Context(sub, info_name=" ".join(path)) as ctx:
                usage = " ".join(sub.collect_usage_pieces(ctx))
            out += [".HP", f"\\fB{roff(' '.join(path))}\\fR {roff(usage)}"]
    out += [".SH DESCRIPTION", ".nf", roff(help_text(command, (name,))), ".fi"]
    if len(tree) > 1:
        out.append(".SH COMMANDS")
        for path, sub in tree[1:]:
            out += [".SS " + roff(" ".join(path)), ".nf", roff(help_text(sub, path)), ".fi"]
    return "\n".join(out) + "\n"


def completion(name: str, command: click.Command) -> str:
    """A static bash completion: subcommands, options, and the choices of options and arguments."""
    function = "_" + name.replace("-", "_")
    cases = []
    for path, sub in walk(command, ()):
        words = []
        choices = []
        for param in sub.params:
            if isinstance(param, click.Option):
                words += [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
                if isinstance(param.type, click.Choice):
                    values = " ".join(param.type.choices)
                    key = " ".join(path)
                    choices += [f'        "{key}:{o}") opts="{values}" ;;' for o in param.opts]
        words += ["--help"]
        if isinstance(sub, click.Group):
            words += sorted(n for n, c in sub.commands.items() if not getattr(c, "hidden", False))
        cases.append(f'        "{" ".join(path)}") words="{" ".join(dict.fromkeys(words))}" ;;')
        cases += choices
    groups = "|".join(" ".join(p) for p, c in walk(command, ()) if isinstance(c, click.Group))
    return f"""# bash completion for {name}, generated from its click commands.
{function}()
{{
    local cur prev path="" next word i words opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        case "|{groups}|" in
            *"|$path|"*)
                next="${{path:+$path }}$word"
                if [[ "$word" != -* && -n "$(_{function}_words "$next")" ]]; then
                    path="$next"
                fi ;;
        esac
    done
    opts="$(_{function}_words "$path:$prev")"
    if [[ -n "$opts" ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return 0
    fi
    words="$(_{function}_words "$path")"
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$(printf '%s\\n' $words | grep -v '^-')" -- "$cur"))
        [[ ${{#COMPREPLY[@]}} -eq 0 ]] && COMPREPLY=($(compgen -f -- "$cur"))
    fi
    return 0
}}
_{function}_words()
{{
    local words="" opts=""
    case "$1" in
{chr(10).join(cases)}
    esac
    printf '%s' "$words$opts"
}}
complete -F {function} {name}
"""


def main() -> None:
    outdir = Path(sys.argv[1])
    from importlib.metadata import version as dist_version

    try:
        version = dist_version("kvmhook")
    except Exception:  # the tree, not an installed distribution
        version = os.environ.get("KVMHOOK_VERSION", "")
    (outdir / "man1").mkdir(parents=True, exist_ok=True)
    (outdir / "bash-completion").mkdir(parents=True, exist_ok=True)
    for name, (module, attribute, summary) in COMMANDS.items():
        command = load(module, attribute)
        (outdir / "man1" / f"{name}.1").write_text(man_page(name, command, summary, version))
        (outdir / "bash-completion" / name).write_text(completion(name, command))


if __name__ == "__main__":
    main()
