"""Layered configuration for fedmq's command-line tools.

Each option is taken from, in order: the command line, the environment variable
``FEDMQ_<DEST>`` (``--batch-size`` -> ``FEDMQ_BATCH_SIZE``), the TOML file given by
``--config`` (keys as the flag without dashes: ``batch_size = 32`` or ``batch-size = 32``),
and finally the parser's default. Errors go through ``parser.error``: one line, exit 2
(`CliParser`: argparse's usage text is printed by --help alone).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_UNSET = object()
ENV_PREFIX = "FEDMQ_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class CliParser(argparse.ArgumentParser):
    """The parser of every fedmq command: an error is one line, `PROG: error: MESSAGE`, exit 2.

    argparse prints its whole usage (9-26 lines for our tools) before the error, which buries
    the one line that matters; the usage is what --help is for. Subparsers inherit the class.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --password must never be taken for --password-file
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        if any(a == "--password" or a.startswith("--password=") for a in argv):
            self.error("there is no --password flag (a password on the command line shows in ps and the shell "
                       "history): put it in a file given with --password-file FILE, or set FEDMQ_PASSWORD")
        return super().parse_known_args(argv, namespace)

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):  # never echo the values: one may be a password
            flags = [word for word in message.split()[2:] if word.startswith("-")]
            message = "unrecognized arguments: " + " ".join(flags) + " (values not shown)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def optional_extra(prog: str, extra: str):
    """Decorate a command's main: a module of an uninstalled extra is one line, exit 2.

    `fedmq-sim` on a plain `pip install fedmq` would otherwise die with a traceback ending in
    "No module named 'rich'"; this says which module is missing and which extra brings it.
    """

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except ModuleNotFoundError as exc:
                top = (exc.name or "").split(".")[0]
                if not top or top in ("protocol", "edge_agent", "coordinator", "simulation", "monitor"):
                    raise
                print(f"{prog}: error: {top} is missing: pip install 'fedmq[{extra}]'", file=sys.stderr)
                return 2

        return run

    return wrap


def require_extra(module: str, extra: str, feature: str) -> None:
    """ValueError (one line naming the extra) when `feature` needs `module` and it is not installed.

    Checked while the configuration is parsed, so `--secure-aggregation` on a plain
    `pip install fedmq` is a configuration error (exit 2), not a traceback at the first round.
    """
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or module).split(".")[0] != module.split(".")[0]:
            raise
        raise ValueError(f"{feature} needs {module}, which is not installed: pip install 'fedmq[{extra}]'") from None


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """--config FILE.toml, the lowest layer of every tool's configuration."""
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file with defaults for any option below (keys as the flag names); "
        "command-line flags and FEDMQ_* environment variables override it",
    )


def layered_parser(prog: str, purpose: str) -> CliParser:
    """A tool's parser with --config, its description saying how options layer (`parse_layered` parses it)."""
    parser = CliParser(prog=prog, description=f"{purpose} Every option can also be set as {ENV_PREFIX}<OPTION> in the "
                                              "environment or in a --config TOML file.")
    add_config_option(parser)
    return parser


def fleet_tool_parser(prog: str, purpose: str, fleet_help: str) -> argparse.ArgumentParser:
    """The parser every fleet tool starts from: --config, the broker connection, --fleet, --topic-prefix.

    Write defaults into help texts: argparse's %(default)s would show the placeholder
    `parse_layered` puts in their place while parsing.
    """
    from protocol.transport import add_broker_options

    parser = layered_parser(prog, purpose)
    add_broker_options(parser)
    parser.add_argument("--fleet", help=f"{fleet_help} (required)")
    parser.add_argument("--topic-prefix", default="fedmq", help="first topic level (default: fedmq)")
    return parser


def parse_layered(
    parser: argparse.ArgumentParser, argv: list[str] | None = None, required: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parse `argv` and fill each option not given there from the environment, then the TOML file.

    Options named in `required` (by dest) must end up set by one of the layers.
    """
    actions = [a for a in parser._actions if a.dest != "help" and a.default is not argparse.SUPPRESS]
    defaults = {a.dest: a.default for a in actions}
    for action in actions:
        action.default = _UNSET
    try:
        ns = parser.parse_args(argv)
    finally:
        for action in actions:
            action.default = defaults[action.dest]
    file_values = _read_toml(parser, ns.config) if getattr(ns, "config", _UNSET) not in (_UNSET, None) else {}
    known = {a.dest for a in actions}
    unknown = sorted(set(file_values) - known)
    if unknown:
        parser.error(f"{ns.config}: unknown option(s) {', '.join(unknown)}")
    for action in actions:
        if getattr(ns, action.dest) is not _UNSET:
            continue
        env_name = ENV_PREFIX + action.dest.upper()
        if env_name in os.environ:
            value = _convert(parser, action, os.environ[env_name], env_name)
        elif action.dest in file_values:
            value = _convert(parser, action, file_values[action.dest], f"{ns.config}: {action.dest}")
        else:
            value = defaults[action.dest]
        setattr(ns, action.dest, value)
    for dest in required:
        if getattr(ns, dest) in (None, ""):
            parser.error(f"--{dest.replace('_', '-')} is required (or {ENV_PREFIX}{dest.upper()} / {dest} in --config)")
    return ns


def _read_toml(parser: argparse.ArgumentParser, path: str) -> dict:
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        parser.error(f"config file not found: {path}")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"cannot read config file {path}: {exc}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, value: object, source: str):
    """Convert an environment string or TOML value the way argparse would convert the flag."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        parser.error(f"{source}: expected true or false, got {value!r}")
    if isinstance(value, (list, dict)):
        parser.error(f"{source}: expected a single value, got {type(value).__name__}")
    if action.type is not None:
        try:
            value = action.type(value if not isinstance(value, bool) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{source}: {exc}")
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        parser.error(f"{source}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value
