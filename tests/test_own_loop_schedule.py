"""The own-loop API's Nesterov correction under a torch LR scheduler (rate changing every step).

torch.optim.SGD(nesterov=True) keeps y = x + delta v in the parameters and a buffer b with
v = -lr b for the lr of the step about to run: when a scheduler changes lr from eta to eta', torch's
velocity becomes (eta' / eta) v while y stays. The reference below is Algorithm 2 with eta_t plus
exactly that rescale, written on flat float64 tensors; the wrapper must send x = y - delta v and move
x (not v) at every exchange. The spec's own form with eta_t (the built-in trainer's) keeps v at a
rate change; the last assertion shows the two differ, so the test tells them apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easgd.comm.message import Header, Op
from easgd.roles import ElasticServer
from tests.test_optimizer_wrapper import analytic_grad, batches, flat, linear_model, wrapped

ALPHA, MOMENTUM, STEPS, TAU = 0.3, 0.9, 12, 3
FACTORS = [1.0, 0.5, 0.5, 2.0, 0.25, 1.0, 0.1, 0.1, 0.7, 0.3, 1.0, 0.05]
"""lr_t / lr_0: a change at most steps, exchanges included (t = 0, 3, 6, 9)."""


def reference(data: list[tuple[Tensor, Tensor]], center0: Tensor, *, rescale: bool):
    """(x, v, center, payloads) of Algorithm 2 with eta_t = 0.1 FACTORS[t] (torch's rescale of v
    at each rate change when ``rescale``)."""
    x, v, center = center0.clone(), torch.zeros(5, dtype=torch.float64), center0.clone()
    payloads = []
    for t, (inputs, targets) in enumerate(data):
        eta = 0.1 * FACTORS[t]
        if rescale and t > 0:  # y = x + delta v stays; v is rescaled, so x shifts
            y, v = x + MOMENTUM * v, v * (FACTORS[t] / FACTORS[t - 1])
            x = y - MOMENTUM * v
        point = x + MOMENTUM * v  # the gradient at the look-ahead, before the elastic move
        if t % TAU == 0:
            payloads.append(x.clone())
            move = ALPHA * (x - center)
            x, center = x - move, center + move
        v = MOMENTUM * v - eta * analytic_grad(point, inputs, targets)
        x = x + v
    return x, v, center, payloads


def test_nesterov_correction_is_exact_when_a_scheduler_changes_the_rate_every_step() -> None:
    center0 = flat(linear_model(seed=0))
    model, optimizer, server = wrapped(
        "eamsgd",
        ElasticServer(center0, moving_rate=ALPHA),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=MOMENTUM, nesterov=True),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: FACTORS[t])
    sent: list[Tensor] = []  # every exchange's payload, as the server receives it
    receive = server.send

    def send(header: Header, payload: Tensor | None = None) -> None:
        if header.op == Op.EXCHANGE and payload is not None:
            sent.append(payload.clone())
        receive(header, payload)

    server.send = send  # type: ignore[method-assign]
    data = batches(STEPS)
    for t, (inputs, targets) in enumerate(data):
        assert optimizer.param_groups[0]["lr"] == 0.1 * FACTORS[t]
        optimizer.zero_grad()
        loss = 0.5 * (model(inputs).squeeze(1) - targets.double()).pow(2).mean()
        loss.backward()
        optimizer.step()
        if t + 1 < STEPS:
            scheduler.step()
    x, v, center, payloads = reference(data, center0, rescale=True)
    assert server.exchange_steps == [0, 3, 6, 9]
    for got, want in zip(sent, payloads, strict=True):  # the x sent at every exchange
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(flat(model), x + MOMENTUM * v, rtol=0, atol=1e-12)
    assert torch.allclose(server.role.center, center, rtol=0, atol=1e-12)
    # the spec's form with eta_t (no rescale of v) is a different trajectory: what a user's torch
    # optimizer does is not what optim.lr_schedule does in easgd.train
    spec_x, spec_v, _, spec_payloads = reference(data, center0, rescale=False)
    assert (spec_payloads[1] - payloads[1]).abs().max() > 1e-4
    assert (spec_x + MOMENTUM * spec_v - flat(model)).abs().max() > 1e-4
    optimizer.close()
