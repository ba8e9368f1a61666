"""What the codec costs on this CPU: encode, decode and the server's whole compressed update.

For each size and format: encode and decode of one message into buffers kept across messages
(ms), and the server's side of one elastic exchange, float32 (``ElasticServer.handle`` into the
receive buffer, the compiled one-pass update) against compressed (``ServerLink.handle``: decode
x^_i, e, quantize e with error feedback, apply, encode). One thread; the actions are interleaved
(each repetition times every one), median and min of the repetitions::

    python benchmarks/compression_codec.py   # prints a table, writes results/compression_codec.csv
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from _common import RESULTS, write_csv

from easgd.comm.compression import Codec, Compression
from easgd.roles import ElasticServer
from easgd.roles.links import ServerLink

REPEATS = 9


def measure(numel: int, names: tuple[str, ...]) -> list[dict[str, float | int | str]]:
    """Codec and server-update times for ``numel`` values in each format of ``names``."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(numel, generator=generator) * 1e-3
    center = torch.randn(numel, generator=generator)
    server = ElasticServer(center, moving_rate=0.3)
    server.compile_update(background=False)
    received = center + values
    actions: dict[str, Callable[[], object]] = {
        "server_float32": lambda: server.handle(0, received, out=received)
    }
    wire_bytes = {}
    for name in names:
        codec, out = Codec(name, numel), torch.empty(numel)
        message = codec.encode(values)
        link = ServerLink(Compression(name, True, True, numel), center)
        worker_message = Codec(name, numel).encode(values)
        wire_bytes[name] = codec.wire_bytes
        actions[f"{name}_encode"] = lambda c=codec, m=message: c.encode(values, out=m)
        actions[f"{name}_decode"] = lambda c=codec, m=message, o=out: c.decode(m, out=o)
        actions[f"{name}_server"] = lambda s=link, m=worker_message: s.handle(server, 0, m)
    times: dict[str, list[float]] = {key: [] for key in actions}
    for action in actions.values():
        action()
    for _ in range(REPEATS):
        for key, action in actions.items():
            started = time.perf_counter()
            action()
            times[key].append(1000 * (time.perf_counter() - started))
    float32 = statistics.median(times["server_float32"])
    rows: list[dict[str, float | int | str]] = []
    for name in names:
        server_ms = statistics.median(times[f"{name}_server"])
        rows.append({
            "numel": numel, "format": name, "wire_bytes": wire_bytes[name],
            "encode_ms": statistics.median(times[f"{name}_encode"]),
            "decode_ms": statistics.median(times[f"{name}_decode"]),
            "server_float32_ms": float32, "server_compressed_ms": server_ms,
            "server_compressed_min_ms": min(times[f"{name}_server"]),
            "compressed_over_float32": server_ms / float32,
        })  # fmt: skip
    return rows


def main() -> None:
    """Measure 1M and 10M values in every compressed format; print and write the table."""
    torch.set_num_threads(1)
    rows = [row for n in (1_000_000, 10_000_000) for row in measure(n, ("bf16", "fp16", "int8"))]
    write_csv(RESULTS / "compression_codec.csv", rows)
    for row in rows:
        print(
            ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
        )


if __name__ == "__main__":
    main()
