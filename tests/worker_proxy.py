"""A TCP proxy in front of an agent's workers, for tests that watch or steer the wire: it
listens on 127.0.0.1:PORT for each port and forwards to 127.0.0.2:PORT (agents started with
``--worker-host 127.0.0.2 --worker-advertise 127.0.0.1``). Subclasses say how one connection is
forwarded (``_forward``); this runs the event loop on a thread and shuts it down."""

from __future__ import annotations

import asyncio
import threading


class WorkerProxy:
    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        for port in self.ports:
            self._servers.append(self._loop.run_until_complete(asyncio.start_server(
                lambda r, w, p=port: self._accept(r, w, p), "127.0.0.1", port)))
        ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      port: int) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.2", port)
        except OSError:
            writer.close()
            return
        await self._forward(reader, writer, up_reader, up_writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def close(self) -> None:
        async def shut() -> None:
            for server in self._servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
