"""How a command runs its Trio main: until SIGTERM/SIGINT (then a bounded stop), with a
startup failure that is the user's reported in one line."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable

import trio


def reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(
        exc
    ).__name__


def startup_error(exc: BaseException, *also: type[Exception]) -> str:
    """One line for a startup failure that is the user's (a port taken after the check, a
    credential file gone, or one of ``also``); anything else is a bug and propagates with
    its traceback."""
    from atlasd.kube.errors import ConfigError

    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    if not leaves or not all(
        isinstance(e, (ConfigError, *also)) or (isinstance(e, OSError) and e.errno) for e in leaves
    ):
        raise exc
    return "; ".join(str(e) for e in leaves)


def serve_until_signalled(
    main: Callable[[], Awaitable[None]],
    *,
    grace: float,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run ``main`` until SIGTERM/SIGINT, then cancel it; a stop taking longer than
    ``grace`` seconds ends the process hard (exit 1) rather than hang half alive."""

    async def supervised() -> None:
        # The receiver must outlive the task reading it: open it around the nursery.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def wait_signal() -> None:
                    async for sig in signals:
                        logging.getLogger("atlasd").info(
                            "%s: stopping (grace %.0fs)", signal.Signals(sig).name, grace
                        )
                        _arm_watchdog(grace)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(wait_signal)
                await main()
                nursery.cancel_scope.cancel()

    trio.run(supervised)


def _arm_watchdog(grace: float) -> None:
    def expire() -> None:
        sys.stderr.write(f"atlasd: did not stop within {grace:.0f}s; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(grace, expire)
    timer.daemon = True
    timer.start()
