"""What every ``python -m rustane.<tool>`` shares: error lines instead of tracebacks, signals, help.

``run(main)`` calls ``main(argv)`` and turns its outcome into an exit code:

- an expected failure (``rustane.errors.RustaneError``, a bad value, an unreadable file) prints
  one ``error: ...`` line on stderr and exits 2, the code argparse uses for bad flags;
- ``raise SystemExit("error: ...")`` (the older spelling) is treated the same way;
- Ctrl-C / SIGTERM outside a training loop (which saves first, ``rustane.interrupts``) exits
  130 with one line;
- anything else is a bug: one ``error: internal error`` line asking for ``--debug``, exit 1.

``--debug`` (anywhere on the command line; or ``RUSTANE_DEBUG=1``) lets every exception through
with its traceback. ``HelpFormatter`` shows each flag's default once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, NoReturn, Sequence

from rustane.errors import RustaneError, one_line

__all__ = ["run", "ArgumentParser", "HelpFormatter", "debug_enabled", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_BUG"]

EXIT_ERROR = 2  # expected failure: same as argparse's usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BUG = 1

# failures of the user's input or machine rather than of rustane: reported, not traced
_EXPECTED = (RustaneError, ValueError, FileNotFoundError, FileExistsError, PermissionError,
             IsADirectoryError, NotADirectoryError, UnicodeError, MemoryError)


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    env = os.environ.get("RUSTANE_DEBUG", "").strip().lower()
    if env not in ("", "0", "false", "no"):
        return True
    return argv is not None and "--debug" in _flags(argv)


def _flags(argv: Sequence[str]) -> list[str]:
    # nothing after "--" is a flag
    args = list(argv)
    return args[:args.index("--")] if "--" in args else args


def _strip_debug(argv: Sequence[str]) -> list[str]:
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    return [a for a in args[:end] if a != "--debug"] + args[end:]


def _sigterm_as_interrupt(signum, frame) -> None:
    # A laptop shutdown, `timeout` or a job scheduler sends SIGTERM: treat it like Ctrl-C, so the
    # same clean-up (and in training, the same final save) runs.
    raise KeyboardInterrupt


def _message(exc: BaseException) -> str:
    msg = one_line(str(exc))
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {msg}"
    if isinstance(exc, MemoryError):
        msg = "out of memory" + (f" ({msg})" if msg else "") + "; try a smaller model, --seq-len or --accum"
    return msg or type(exc).__name__


def _error(msg: str, code: int) -> NoReturn:
    msg = msg[len("error:"):].strip() if msg.startswith("error:") else msg
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a CLI ``main(argv) -> exit code`` and exit the process the way the module doc says."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = _strip_debug(argv)
    previous_term = None
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            previous_term = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        pass
    # code that handles its own errors (python -m rustane.bench) asks debug_enabled() too
    previous_env = os.environ.get("RUSTANE_DEBUG")
    if debug:
        os.environ["RUSTANE_DEBUG"] = "1"
    try:
        code = _call(main, argv, debug)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if previous_env is None:
            os.environ.pop("RUSTANE_DEBUG", None)
        else:
            os.environ["RUSTANE_DEBUG"] = previous_env
    raise SystemExit(0 if code is None else int(code))


def _call(main: Callable[[list[str]], int | None], argv: list[str], debug: bool) -> int | None:
    try:
        return main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            if debug:
                raise
            _error(exc.code, EXIT_ERROR)
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `... | head` closed the pipe: not an error of ours; keep Python from complaining at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        raise SystemExit(EXIT_BUG)
    except _EXPECTED as exc:
        if debug:
            raise
        _error(_message(exc), EXIT_ERROR)
    except Exception as exc:
        if debug:
            raise
        _error(f"internal error ({type(exc).__name__}: {_message(exc)}); rerun with --debug for the "
               f"traceback and please report it", EXIT_BUG)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with rustane's conventions: ``HelpFormatter``, and a bad flag reported as one
    ``error:`` line pointing at ``--help`` (argparse prints the whole usage block first)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # run() acts on --debug before parsing; declared here so --help lists it
        self._own_debug = self.add_argument(
            "--debug", action="store_true", help="show Python tracebacks instead of one error line (or set RUSTANE_DEBUG=1)")

    def add_argument(self, *args, **kwargs):
        own = getattr(self, "_own_debug", None)
        if own is not None and "--debug" in args:
            # the tool declares its own --debug (with its own help): it replaces ours
            self._remove_action(own)
            self._option_string_actions.pop("--debug", None)
            for group in self._action_groups:
                if own in group._group_actions:
                    group._group_actions.remove(own)
            self._own_debug = None
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see {self.prog} --help)", EXIT_ERROR)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after a flag's help unless the help text already names its default
    (argparse's own formatter adds it regardless, so such flags showed the default twice)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return help_text
        return super()._get_help_string(action)
