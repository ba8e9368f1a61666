"""What the codec costs on this CPU: encode, decode and the server's whole compressed update.

For each size and format: encode and decode of one message (ms), and the server's side of one
elastic exchange, float32 (``ElasticServer.handle``) against compressed (``ServerLink.handle``:
decode x^_i, e, quantize e, apply, encode). One thread, median of repeats::

    python benchmarks/compression_codec.py            # prints a table, writes results/compression_codec.csv
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable

import torch

from easgd.comm.compression import Codec, Compression
from easgd.roles import ElasticServer
from easgd.roles.links import ServerLink


def median_ms(action: Callable[[], object], repeats: int = 7) -> float:
    """Median wall time of ``action`` in milliseconds, after one untimed call."""
    action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def measure(numel: int, name: str) -> dict[str, float | int | str]:
    """Codec and server-update times for ``numel`` values in format ``name``."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(numel, generator=generator) * 1e-3
    codec = Codec(name, numel)
    wire = codec.encode(values)
    center = torch.randn(numel, generator=generator)
    server = ElasticServer(center, moving_rate=0.3)
    link = ServerLink(Compression(name, True, True, numel), center)
    worker_wire = Codec(name, numel).encode(values)
    plain_payload = center + values
    return {
        "numel": numel,
        "format": name,
        "wire_bytes": codec.wire_bytes,
        "encode_ms": median_ms(lambda: codec.encode(values)),
        "decode_ms": median_ms(lambda: codec.decode(wire)),
        "server_float32_ms": median_ms(lambda: server.handle(0, plain_payload)),
        "server_compressed_ms": median_ms(lambda: link.handle(server, 0, worker_wire)),
    }


def main() -> None:
    """Measure 1M and 10M values in every compressed format; print and write the table."""
    torch.set_num_threads(1)
    rows = [measure(n, name) for n in (1_000_000, 10_000_000) for name in ("bf16", "fp16", "int8")]
    with open("benchmarks/results/compression_codec.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(
            ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
        )


if __name__ == "__main__":
    main()
