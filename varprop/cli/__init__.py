"""The ``varprop`` command line: parses options, calls the library, writes results.

Each command lives in its own module, imported only when that command runs,
so ``varprop --help`` loads neither NumPy nor pandas nor matplotlib.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import importlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

import click

from ..errors import SpecError

# name -> (module:attribute, one-line help shown by ``varprop --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulate:simulate", "Measure every layer of a deep stack; write a report."),
    "theory": ("theory:theory_cmd", "Mean-field fixed point q*, chi_1, phase and depth scales."),
    "gain": ("theory:gain", "Both gains of an activation, z ~ N(0, 1)."),
    "fit": ("theory:fit_cmd", "The sqrt(fan_in) law, fitted over one layer."),
    "phase": ("theory:phase_cmd", "The order-to-chaos phase diagram over (sigma_w^2, sigma_b^2)."),
    "check": ("check:check_cmd", "Does an init keep the std within a band? Exit 0 yes, 1 no."),
    "train": ("train:train_cmd", "Train the batch-norm study's MLP on MNIST; loss and per-layer statistics."),
    "inspect": ("inspect:inspect_cmd", "Measure your own PyTorch model at initialization, over re-initialisations."),
    "sweep": ("sweep:sweep_cmd", "A grid of configurations on dask, resumable; Parquet results."),
    "report": ("report:report_cmd", "Redraw a saved run's report without rerunning it."),
    "gallery": ("report:gallery_cmd", "Regenerate the committed reports/ gallery."),
}


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: unwinds like Ctrl-C, so staging is cleaned up on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = [s for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]
_interrupted = False
_unraisable_before = sys.unraisablehook  # the hook _redeliver passes every other exception to
_resend: dict[str, Any] = {}  # the pending re-delivery of a dropped signal: its timer, its signal, whether sent


def _on_signal(signum: int, frame: Any) -> None:
    global _interrupted
    outdir = sys.modules.get("varprop.outdir")
    if _interrupted or (outdir is not None and outdir.deferring(signum)):
        return  # already unwinding, or inside a rename that must finish first: it is delivered after
    _interrupted = True
    raise Interrupted(signum)


def _redeliver(args: Any) -> None:
    """``sys.unraisablehook``: a signal that landed while a finaliser ran (a weakref callback, ``__del__``)
    had its exception dropped by Python (else the run would go on, every later signal ignored as if already
    unwinding). The signal is sent again from a timer thread, so that it is handled after this hook and the
    finaliser have returned (raised here, it would be dropped as well); should it land in a finaliser
    again, it comes back here."""
    global _interrupted
    if isinstance(args.exc_value, Interrupted):
        _interrupted = False
        signum = args.exc_value.signum

        def send() -> None:
            _resend["sent"] = True
            os.kill(os.getpid(), signum)
        timer = threading.Timer(0.01, send)
        timer.daemon = True
        _resend.update(timer=timer, signum=signum, sent=False)
        timer.start()
        return
    _unraisable_before(args)


def _unsent_signal() -> int | None:
    """The signal a pending re-delivery has not sent yet (the command ended first), cancelled; else None."""
    timer = _resend.pop("timer", None)
    if timer is None:
        return None
    timer.cancel()
    timer.join()
    return None if _resend.get("sent") else _resend.get("signum")


def _install_handlers() -> dict[int, Any]:
    """Our handler for each signal that would otherwise kill us (one that is
    ignored, e.g. SIGHUP under nohup, stays ignored); returns the old ones."""
    global _interrupted, _unraisable_before
    _interrupted = False
    if threading.current_thread() is not threading.main_thread():
        return {}
    if sys.unraisablehook is not _redeliver:
        _unraisable_before, sys.unraisablehook = sys.unraisablehook, _redeliver
    old = {}
    for name in _SIGNALS:
        num = getattr(signal, name)
        if signal.getsignal(num) in (signal.SIG_DFL, signal.default_int_handler):
            old[num] = signal.signal(num, _on_signal)
    return old


@contextlib.contextmanager
def _reader_left() -> Iterator[None]:
    """The reader of the output left (`varprop ... | head -1`): what was written stands. Exit as a process
    that SIGPIPE ended (128 + 13, as an interrupt's 128 + its signal), not click's 1, check's "fails"; what
    is still buffered goes nowhere rather than raising again at exit."""
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + getattr(signal, "SIGPIPE", 13))


class _Group(click.Group):
    """Commands loaded on first use; every error is one line on stderr and
    exit status 2, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                             list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS and not ctx.resilient_parsing:
            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            ctx.fail(f"no command {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                     + " (varprop --help lists them)")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])

    def invoke(self, ctx: click.Context) -> Any:
        with _reader_left():
            return super().invoke(ctx)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _reader_left():  # --help and --version print here
            return super().parse_args(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        old = _install_handlers()
        outdir = sys.modules.get("varprop.outdir")
        published_before = len(outdir.published()) if outdir is not None else 0
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"varprop: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except SpecError as exc:
            click.echo(f"varprop: error: {exc}", err=True)
            sys.exit(2)
        except Interrupted as exc:
            # The terminal echoed ^C without a newline; a pipe or a file gets exactly one line.
            outdir = sys.modules.get("varprop.outdir")
            done = outdir.published()[published_before:] if outdir is not None else []
            click.echo(("\n" if exc.signum == signal.SIGINT and sys.stderr.isatty() else "")
                       + "varprop: interrupted" + (f" after {', '.join(done)} {'was' if len(done) == 1 else 'were'} "
                                                   "written whole" if done else ""),
                       err=True)
            sys.exit(128 + exc.signum)
        except click.Abort:
            click.echo("varprop: aborted", err=True)
            sys.exit(1)
        finally:
            unsent = _unsent_signal()
            for num, handler in old.items():
                signal.signal(num, handler)
            if sys.unraisablehook is _redeliver:
                sys.unraisablehook = _unraisable_before
            if unsent is not None:  # interrupted, though the command ended before the signal was sent again
                click.echo("varprop: interrupted", err=True)
                sys.exit(128 + unsent)  # noqa: B012  (this exit is the one that counts)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, invoke_without_command=True)
@click.version_option(package_name="varprop")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Monte-Carlo variance propagation through deep networks at initialization."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def run() -> None:
    """The ``varprop`` command and ``python -m varprop``: :func:`main`, then the process ends
    without the interpreter's teardown.

    Once a command has written its outputs (files closed, staging published, the figure child
    reaped), tearing down the interpreter only frees memory the process is about to lose: clearing
    pandas', matplotlib's and SciPy's modules and collecting their objects took 0.15-0.23 s, 5-9% of
    a 25-block report's whole command (benchmarks/RESULTS-residual.md). The exit functions still run
    (atexit: temporary directories, loggers) and the streams are flushed; the teardown is kept where
    it may matter: another Python thread alive, a tracer or profiler attached (coverage, cProfile),
    an exit status that is not a number, or output that cannot be flushed."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
        parallel = sys.modules.get("varprop.parallel")
        if parallel is not None:
            parallel.shutdown()  # the pools' idle threads, which would keep the teardown
        if (code is None or isinstance(code, int)) and threading.active_count() == 1 and not (
                sys.gettrace() or sys.getprofile()):
            run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
            try:
                if run_exitfuncs is not None:
                    run_exitfuncs()
                    for stream in (sys.stdout, sys.stderr):
                        if stream is not None:  # (None: started with the stream closed)
                            stream.flush()
                    os._exit(code or 0)
            except (OSError, ValueError):  # a closed or broken stream: the ordinary exit reports it
                pass
        raise

