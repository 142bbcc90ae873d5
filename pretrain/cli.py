"""`proseco`: one command line for the whole data flow.

    proseco config show|docs          the resolved config / the config reference
    proseco tokenizer train|shard     text -> tokenizer -> token shards
    proseco train CONFIG [a.b=v ...]  pretrain (one process, torchrun, srun or deepspeed)
    proseco plan CONFIG --world-size N --device-memory GB   memory per rank and step time of a layout
    proseco convert export|import     checkpoints to and from Hugging Face folders

Subcommands live next to the code they run; each module registers its own parser so that
importing the CLI stays cheap (torch is imported only by the commands that need it).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from parallel.env import LaunchError, detect_launch, end_process, ended_a_process_group
from pretrain.config import load_config, reference_markdown, split_config_args, to_yaml, validate
from pretrain.errors import UserError


def _config_show(args: argparse.Namespace) -> None:
    cfg = load_config(*split_config_args(args.config, args.overrides))
    validate(cfg, world_size=args.world_size)
    print(to_yaml(cfg), end="")


def _config_docs(args: argparse.Namespace) -> None:
    text = reference_markdown()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="show the resolved config or the config reference")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved, validated config")
    show.add_argument("config", nargs="?", help="YAML file (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="section.field=value overrides")
    show.add_argument("--world-size", type=int, default=1, help="processes the run would be launched with")
    show.set_defaults(func=_config_show)
    docs = config_sub.add_parser("docs", help="print (or write) the config reference as markdown")
    docs.add_argument("--out", help="write to this file instead of stdout")
    docs.set_defaults(func=_config_docs)


DISTRIBUTION = "proseco-pretrain"


def installed_version() -> str:
    """The version of the installed distribution (what pip installed), not a copy kept in the code."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proseco", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    # The DeepSpeed launcher puts --local_rank=N before the script's own arguments; the process
    # reads its local rank from LOCAL_RANK (which the launcher sets too), so the flag is accepted
    # and otherwise ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_commands(sub)
    from pretrain.commands import add_commands as add_pretrain_commands
    from pretrain.convert.cli import add_commands as add_convert_commands
    from tokenizer.cli import add_commands as add_tokenizer_commands

    add_tokenizer_commands(sub)
    add_pretrain_commands(sub)
    add_convert_commands(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with flags allowed anywhere: `proseco train CFG a.b=1 --print-result c.d=2`.

    argparse binds positionals in runs between flags, so overrides after a flag come back as
    unrecognized arguments; they are appended, in order, to the command's overrides. (The
    standard library's parse_intermixed_args refuses parsers with subcommands.)"""
    args, extras = parser.parse_known_args(argv)
    late = [arg for arg in extras if "=" in arg and not arg.startswith("-")]
    unknown = [arg for arg in extras if arg not in late]
    if late and hasattr(args, "overrides"):
        if args.config is None:  # `config show --world-size 8 a.b=1`: split_config_args sorts it out
            args.config, late = late[0], late[1:]
        args.overrides = [*args.overrides, *late]
    elif late:
        unknown = extras
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def global_rank() -> int:
    """This process's rank in the job (RANK, else SLURM_PROCID, else 0), before any process group."""
    return detect_launch().rank


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args.func(args) or 0
    except (UserError, LaunchError) as err:  # config errors, missing files, mismatched shards...: no traceback
        # Every rank of a launch validates the same config and reads the same files, so the
        # message is the same on each: print it once, on rank 0; every rank still exits with 2.
        if global_rank() == 0:
            print(f"proseco: error: {err}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The `proseco` command (also `python -m pretrain`): main(), then exit with its code. A rank of
    a multi-process run leaves through `end_process`, so that the code reaches the launcher intact."""
    code = main()
    if ended_a_process_group():
        end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
