"""optim.precision and optim.compile: the wrapped training forward (easgd/models/step.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from easgd.config.schema import TrainConfig
from easgd.data.digits import load_digits_split
from easgd.data.sampling import MinibatchSampler
from easgd.flat import FlatModel
from easgd.models.step import LocalStepForward, for_local_steps
from easgd.parts.build import build_model


def digits_mlp() -> tuple[nn.Module, MinibatchSampler]:
    split = load_digits_split(test_fraction=0.2, seed=0)
    module = build_model(TrainConfig().model, split, seed=0)
    return module, MinibatchSampler(split, batch_size=128, worker_index=0, num_workers=1)


def sgd_steps(module: nn.Module, sampler: MinibatchSampler, steps: int) -> Tensor:
    """x after ``steps`` plain SGD steps through FlatModel's hot path (gradient pieces)."""
    flat = FlatModel(module)
    point = flat.initial_point()
    for _ in range(steps):
        _, grads = flat.gradient(point, *sampler.sample())
        point = point - 0.05 * torch.cat([g.reshape(-1) for g in grads])
    return point


def test_defaults_return_the_module_itself() -> None:
    module = nn.Linear(3, 2)
    assert for_local_steps(module, precision="fp32", compile=False) is module
    with pytest.raises(ValueError, match="precision='fp16'; allowed: fp32, bf16"):
        for_local_steps(module, precision="fp16", compile=False)


def test_bf16_leaves_cpu_forward_and_every_parameter_float32_untouched() -> None:
    # bf16 is CUDA autocast only: on CPU tensors (the server's evaluator, this machine) the
    # wrapped forward is the plain one, bit for bit, and the parameters are the module's own
    module, sampler = digits_mlp()
    wrapped = for_local_steps(module, precision="bf16", compile=False)
    assert isinstance(wrapped, LocalStepForward)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in module.parameters()]
    assert all(p.dtype == torch.float32 for p in wrapped.parameters())
    inputs, _ = sampler.sample()
    assert torch.equal(wrapped(inputs), module(inputs))


@pytest.mark.slow  # inductor compiles C++ for the CPU: about 30 s on a 2-core machine
def test_compiled_first_steps_equal_eager_ones_within_float32_rounding() -> None:
    eager_module, eager_sampler = digits_mlp()
    compiled_module, compiled_sampler = digits_mlp()
    eager = sgd_steps(eager_module, eager_sampler, steps=3)
    compiled = sgd_steps(
        for_local_steps(compiled_module, precision="fp32", compile=True), compiled_sampler, steps=3
    )
    # the same math with other kernels: fused operations and reductions round differently, so
    # not bit for bit (measured: 2e-8, two float32 ulps of the largest weight, about 0.13).
    # 1e-6 is about 100 ulps: far below any real difference in g (a dropped term, a wrong
    # point), which would move x by eta * |g| ~ 1e-3.
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-6)
    start = FlatModel(digits_mlp()[0]).initial_point()
    assert float((eager - start).abs().max()) > 1e-4  # the steps did move x
