"""The server's elastic update as one compiled pass over memory (``torch.compile``), when it builds.

e = alpha (x_i - center) and center <- center + e, written as :func:`elastic_update_` does, but
as one loop that reads x_i and the center once and writes e and the center once. Eager torch needs
a kernel per operation, so even chunked (:func:`easgd.algorithms.inplace.elastic_update_`) it
pays Python dispatch per chunk and a trip through the cache per operation: measured here at about
0.4-0.5 of a ``torch.add_`` of the same size, the compiled loop at 0.75-0.95
(``benchmarks/server_capacity.py``). The compiled loop performs the same float32 operations in the
same order (a subtraction, a product, a sum, each rounded), so its results are bit for bit the
eager ones (tested).

Compiling takes seconds (Inductor writes and builds C++), so :class:`FusedElasticUpdate` compiles
in a background thread for the one size the server will see, and the eager update serves until it
is ready. Where it cannot build (no C++ compiler, ``EASGD_COMPILE=0``), it says so once in the log
and the eager update serves on. Never imports ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FUSED_MIN_VALUES = 1 << 18
"""Below this size the eager update is as fast (everything in cache) and not worth a compile."""


def _elastic_update(center: Tensor, worker: Tensor, out: Tensor, moving_rate: float) -> None:
    elastic_diff = (worker - center) * moving_rate
    out.copy_(elastic_diff)
    center.add_(elastic_diff)


def compile_enabled() -> bool:
    """False when ``EASGD_COMPILE=0`` (the server's update then stays eager)."""
    return os.environ.get("EASGD_COMPILE", "1") != "0"


class FusedElasticUpdate:
    """out <- e = alpha (x_i - center); center <- center + e, in one compiled pass.

    Built in the background for ``numel`` values with ``out`` aliasing ``x_i`` (the server's
    receive buffer, as ``ElasticServer.handle(out=payload)`` uses it); :meth:`__call__` returns
    False (and does nothing) until it is ready, or if it could not be built.
    """

    def __init__(self, numel: int, *, moving_rate: float, background: bool = True) -> None:
        self.numel = numel
        self.moving_rate = moving_rate
        self.ready = threading.Event()
        self.error: str | None = None
        """Why the compiled update is not available (None: building or ready)."""
        self._kernel: Callable[..., None] | None = None
        if background:
            threading.Thread(target=self._build, name="compile-update", daemon=True).start()
        else:
            self._build()

    def _build(self) -> None:
        try:
            kernel = torch.compile(_elastic_update, dynamic=False, fullgraph=True)
            center, worker = torch.zeros(self.numel), torch.ones(self.numel)
            kernel(center, worker, worker, self.moving_rate)  # compiles for this size and aliasing
            self._kernel = kernel
            self.ready.set()
        except Exception as err:  # no C++ compiler, an Inductor limit: the eager update serves
            self.error = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("the server's update stays eager: torch.compile failed (%s)", self.error)

    def __call__(self, center: Tensor, worker: Tensor, out: Tensor) -> bool:
        """Apply the update if the compiled kernel fits these tensors; False: not applied.
        ``center`` must be a contiguous float32 CPU tensor of ``numel`` values (the role's)."""
        kernel = self._kernel
        if kernel is None or not (
            out is worker or out.data_ptr() == worker.data_ptr() and out.shape == worker.shape
        ):
            return False
        if worker.numel() != self.numel or worker.dtype != torch.float32:
            return False
        if not worker.is_contiguous() or worker.device.type != "cpu":
            return False
        kernel(center, worker, out, self.moving_rate)
        return True
