"""Probe kbloop's behaviour when io_uring is unavailable; prints one JSON object.

    python fallback_probe.py <seccomp|env> <check>

"seccomp" installs a real seccomp filter denying io_uring_setup before importing kbloop;
"env" relies on KBLOOP_FORCE_URING_ERROR being set by the caller.
"""
import asyncio
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


async def echo_roundtrip():
    done = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        done.set_result(None)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    data = await reader.readexactly(5)
    writer.close()
    await writer.wait_closed()
    await done
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.01)
    return data.decode()


async def loop_kind():
    loop = asyncio.get_running_loop()
    return type(loop).__module__ + "." + type(loop).__qualname__, await echo_roundtrip()


def main():
    mode, check = sys.argv[1], sys.argv[2]
    res = {}
    if mode == "seccomp":
        from seccomp_no_uring import install_no_uring_filter, io_uring_setup_errno
        import errno

        install_no_uring_filter()
        res["raw_setup_errno"] = errno.errorcode.get(io_uring_setup_errno())

    with warnings.catch_warnings(record=True) as import_warnings:
        warnings.simplefilter("always")
        import kbloop
    res["import_warnings"] = [str(w.message) for w in import_warnings]

    if check == "forced":
        try:
            lp = kbloop.new_event_loop(backend="io_uring")
        except kbloop.BackendUnavailable as e:
            res["raised"] = type(e).__name__
            res["is_runtime_error"] = isinstance(e, RuntimeError)
            res["message"] = str(e)
        except BaseException as e:  # noqa: BLE001 - report the wrong exception type
            res["raised"] = "other:" + type(e).__name__ + ":" + str(e)
        else:
            res["raised"] = None
            lp.close()
    elif check == "default":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lp = kbloop.new_event_loop()
        res["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
        res["is_abstract_loop"] = isinstance(lp, asyncio.AbstractEventLoop)
        res["is_base_event_loop"] = isinstance(lp, asyncio.BaseEventLoop)
        res["module"] = type(lp).__module__
        try:
            res["kind"], res["echo"] = lp.run_until_complete(loop_kind())
        finally:
            lp.close()
    elif check == "run":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res["kind"], res["echo"] = kbloop.run(loop_kind())
        res["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
    elif check == "info":
        res["info"] = kbloop.info()
    else:
        raise SystemExit("unknown check " + check)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
