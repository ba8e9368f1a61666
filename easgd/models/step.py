"""The model's training forward under ``optim.precision=bf16`` and ``optim.compile=true``.

:func:`for_local_steps` wraps a network so that its forward on the gradient path (autograd
enabled) runs compiled (``torch.compile``) and/or under CUDA bf16 autocast, while evaluation
(under ``torch.no_grad``: the center's test error, BatchNorm statistics) runs the plain network
in float32, so test figures stay comparable between runs. Neither changes a parameter's dtype:
x_i, v_i, a_i, the center and every update of the spec stay float32; bf16 only rounds the
activations and the gradient g that the update reads (logits are cast back to float32 before the
loss). With both off (the default) the network is returned as it is.

What each does to the math: ``compile`` computes the same g with other kernels (fused
operations round differently, within a few float32 ulps), so a compiled run is not bit for bit a
simulated one; ``bf16`` rounds g to about 3 significant digits, and only on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class LocalStepForward(nn.Module):
    """``inner`` whose forward, when autograd is on, is compiled and/or under bf16 autocast.

    The parameters, buffers and state-dict keys are ``inner``'s (under ``inner.``); the
    compiled function is kept outside the module tree, so nothing is registered twice.
    """

    def __init__(self, inner: nn.Module, *, bf16: bool, compile: bool) -> None:
        super().__init__()
        self.inner = inner
        self.bf16 = bf16
        self.compiled = compile
        train_forward: Callable[[Tensor], Tensor] = torch.compile(inner) if compile else inner
        object.__setattr__(self, "_train_forward", train_forward)  # not a submodule

    def forward(self, inputs: Tensor) -> Tensor:
        """The logits (float32), from the compiled/autocast path when gradients are recorded."""
        if not torch.is_grad_enabled():
            return self.inner(inputs)
        forward: Callable[[Tensor], Tensor] = self.__dict__["_train_forward"]
        if not (self.bf16 and inputs.is_cuda):
            return forward(inputs)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            logits = forward(inputs)
        return logits.float()


def for_local_steps(module: nn.Module, *, precision: str, compile: bool) -> nn.Module:
    """``module`` set up for ``optim.precision`` (fp32 or bf16) and ``optim.compile``.

    Returns ``module`` itself when there is nothing to do, so the default path is unchanged.
    bf16 acts only on CUDA inputs (a CPU copy, such as the server's evaluator, runs float32).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; allowed: fp32, bf16")
    if precision == "fp32" and not compile:
        return module
    return LocalStepForward(module, bf16=precision == "bf16", compile=compile)
