"""A bare grpc.aio server: the `grpc-bare` scenario's target, measuring what grpc.aio itself
costs per call on this machine, so `noop` (the same call through our whole server stack)
can be read against it.

It answers grpc.health.v1.Health/Check with SERVING from a generic handler: no interceptor,
no servicer class, no metrics or logs. N processes share the port through SO_REUSEPORT and
run on uvloop, as the real server's workers do.

    python -m tests.bench.bare_server PORT WORKERS
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys

import grpc
from grpc_health.v1 import health_pb2

SERVING: bytes = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.SERVING
).SerializeToString()


async def _serve(port: int) -> None:
    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return SERVING

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {"Check": grpc.unary_unary_rpc_method_handler(check)},
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0)


def _worker(port: int) -> None:
    import uvloop

    uvloop.run(_serve(port))


def main() -> None:
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(port,)) for _ in range(workers)]
    for process in processes:
        process.start()
    # Blocked only now: the workers must not inherit the mask (their loops handle signals).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10)


if __name__ == "__main__":
    main()
