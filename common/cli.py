"""Entry-point plumbing: turn bad input (`common.errors.UserError`) into one clear line and exit code 2.

Every stage is `python -m <pkg>.<stage> --config FILE [dotted.key=value ...]` and an importable
`main(argv=None) -> int`. Exit codes: 0 success, 2 bad input or config (one line on stderr, no traceback
unless `--debug`), 1 internal error (traceback).

    main = config_main(TrainConfig, train, __doc__)
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from common import errors

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2


def _report(exc: BaseException, debug: bool) -> int:
    if isinstance(exc, errors.UserError):
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    traceback.print_exc()
    print(f"internal error: {type(exc).__name__}: {exc} (this is a bug; please report it with the traceback above)",
          file=sys.stderr)
    return EXIT_INTERNAL


def _run_guarded(body: Callable[[], int | None], debug: bool) -> int:
    try:
        code = body()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that maps every failure to an exit code
        return _report(exc, debug)
    return EXIT_OK if code is None else int(code)


class _ConfigStageParser(argparse.ArgumentParser):
    """A stage parser whose help ends with the table of config keys of `cfg_cls`. The table is built (an `ast` pass
    over the config sources, ~60 ms) only when help is printed, not at every start of the stage."""

    def __init__(self, cfg_cls: type | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cfg_cls = cfg_cls

    def format_help(self) -> str:
        if self._cfg_cls is not None and self.epilog is None:
            from common.config import config_help

            self.epilog = config_help(self._cfg_cls)
        return super().format_help()


def stage_parser(description: str | None, prog: str | None = None,
                 cfg_cls: type | None = None) -> argparse.ArgumentParser:
    """The shared parser: `--config FILE`, `--print-config`, `--debug` and trailing `dotted.key=value` overrides;
    with `cfg_cls`, `--help` also lists every config key (type, default, docstring)."""
    parser = _ConfigStageParser(cfg_cls, prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML or TOML file holding what differs from the defaults")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults + file + overrides) as YAML and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors too")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    return parser


def config_main(cfg_cls: type, body: Callable[[Any], int | None], description: str | None = None,
                prog: str | None = None) -> Callable[[Sequence[str] | None], int]:
    """Build `main(argv=None) -> int` for a config-driven stage: load the config, then call `body(cfg)`."""
    from common.config import dump_config, load_config

    def main(argv: Sequence[str] | None = None) -> int:
        parser = stage_parser(description, prog, cfg_cls)
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

        def run() -> int | None:
            cfg = load_config(cfg_cls, args.config, args.overrides)
            if args.print_config:
                print(dump_config(cfg), end="")
                return EXIT_OK
            return body(cfg)

        return _run_guarded(run, args.debug)

    main.config_class = cfg_cls  # type: ignore[attr-defined]  # what `--help` documents (checked by tests/test_repo.py)
    return main


def guarded_main(body: Callable[[argparse.Namespace], int | None],
                 parser: argparse.ArgumentParser) -> Callable[[Sequence[str] | None], int]:
    """Build `main(argv=None) -> int` for a stage with its own parser (e.g. `sample_data OUT`)."""
    if not any(a.dest == "debug" for a in parser._actions):
        parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors too")

    def main(argv: Sequence[str] | None = None) -> int:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        return _run_guarded(lambda: body(args), args.debug)

    return main


def list_stages(package: str, stages: dict[str, str]) -> int:
    """Print the stages of a package, one line each (what `python -m <pkg>` shows)."""
    width = max(len(f"python -m {package}.{name}") for name in stages)
    print(f"{package} stages:")
    for name, line in stages.items():
        print(f"  {f'python -m {package}.{name}':<{width}}  {line}")
    print("\nEach stage takes --config FILE and dotted.key=value overrides; add --help for its options.")
    return EXIT_OK
