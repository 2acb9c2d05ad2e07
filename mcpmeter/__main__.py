"""Entry point: ``mcpmeter`` and ``python -m mcpmeter``.

Every error meant for the user is one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from mcpmeter.errors import MeterError

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["wrap"]:  # the fast path: a client is waiting for its server
        from mcpmeter.cli import wrap as wrap_cli

        try:
            return wrap_cli.main(args[1:])
        except MeterError as exc:
            _error(str(exc))
            return exc.exit_code

    import typer

    from mcpmeter.cli.app import app

    try:
        result = app(args=args, prog_name="mcpmeter", standalone_mode=False)
    except MeterError as exc:
        _error(str(exc))
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        _error("aborted")
        return 130
    except typer.TyperException as exc:  # click's usage errors
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        _error(" ".join(str(message).split()))
        return int(getattr(exc, "exit_code", 2))
    except BrokenPipeError:
        return 141
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


def _error(message: str) -> None:
    sys.stderr.write(f"mcpmeter: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
