"""A server-style program that shuts down on SIGTERM through loop.add_signal_handler.

    python unix_graceful.py {asyncio|kbloop}

Prints "ready" once the handler is installed, then waits.  SIGTERM: the handler sets an event,
main() returns and prints "graceful".  SIGINT (no handler for it): asyncio.Runner's own Ctrl-C
handling applies, so main() is cancelled and KeyboardInterrupt ends the program.
"""
import asyncio
import signal
import sys

import kbloop


async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", type(loop).__name__, flush=True)
    try:
        await stop.wait()
    except asyncio.CancelledError:
        print("main cancelled", flush=True)
        raise
    print("graceful", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "kbloop":
        kbloop.run(main())
    else:
        asyncio.run(main())
    print("exited", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
