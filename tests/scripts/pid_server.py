"""An unmodified asyncio server that tells each client which process (and core) served it."""
import argparse
import asyncio
import os


async def main(port):
    async def handle(reader, writer):
        cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        loop_module = type(asyncio.get_running_loop()).__module__
        writer.write(f"{os.getpid()} {cpus} {loop_module}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    try:
        asyncio.run(main(parser.parse_args().port))
    except KeyboardInterrupt:
        pass
