"""The own-loop optimizer wrapper against the spec's equations, in one process.

The worker side is the real ElasticOptimizer on the real WorkerLoop; the server end of its pair is
an in-process stand-in that answers with a real server role (ElasticServer, DownpourServer). The
references below compute docs/algorithms.md's equations on flat float64 tensors with
an analytic gradient, independently of the code under test.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from easgd.api import ElasticOptimizer, join
from easgd.api.session import RUN_KEY, Session
from easgd.comm.groups import DistEnv
from easgd.comm.message import ERROR_NON_FINITE, ERROR_SHAPE_MISMATCH, Header, Op
from easgd.roles import DownpourServer, ElasticServer, ServerRole

TAU, STEPS, LR = 3, 10, 0.1


class InProcessServer:
    """The server end of a worker's PairTransport, answered in process by a server role."""

    def __init__(self, role: ServerRole, numel: int) -> None:
        self.role = role
        self.numel = numel  # the worker's payload size, as PairTransport.numel
        self.exchange_steps: list[int] = []
        self.refuse_next = False
        self.stop = False
        self.mark_next = 0
        """Mark the reply to the next exchange with this snapshot number (the marker cut)."""
        self.state_at_mark: dict | None = None
        self.acks: list[int] = []
        self._reply: tuple[Header, Tensor | None] = (Header(Op.REPLY), None)

    def send_control(self, header: Header, payload: Tensor | None = None) -> None:
        assert header.op == Op.HELLO
        size = self.role.center.numel()
        if header.num_params != size:
            self._reply = (Header(Op.REPLY, error=ERROR_SHAPE_MISMATCH, num_params=size), None)
        else:
            self._reply = (Header(Op.REPLY), self.role.center.clone())

    def recv_control(self) -> tuple[Header, Tensor | None]:
        return self._reply

    def send(self, header: Header, payload: Tensor | None = None) -> None:
        if header.op != Op.EXCHANGE:
            self._reply = (Header(Op.REPLY), None)
            return
        assert payload is not None
        self.exchange_steps.append(header.step)
        self.acks.append(header.saved_snapshot)
        mark, self.mark_next = self.mark_next, 0
        if mark:  # the server's part: its state when the snapshot started, before this exchange
            self.state_at_mark = copy.deepcopy(self.role.state_dict())
        if self.refuse_next:
            self.refuse_next = False
            self._reply = (Header(Op.REPLY, error=ERROR_NON_FINITE), self.role.center.clone())
        else:
            reply = self.role.handle(1, payload.clone()).clone()
            self._reply = (Header(Op.REPLY, stop=self.stop, snapshot=mark), reply)

    def recv(self) -> tuple[Header, Tensor | None]:
        return self._reply


def session_for(algorithm: str, model: nn.Module | None = None, **run: object) -> Session:
    store = dist.HashStore()
    info: dict[str, object] = {"algorithm": algorithm, **run}
    store.set(RUN_KEY, json.dumps(info))
    return Session(DistEnv(rank=1, world_size=2, local_rank=0, restart_count=0), {}, store)


def linear_model(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 1, dtype=torch.float64)


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen))
        for _ in range(steps)
    ]


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def analytic_grad(point: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
    """Gradient of 0.5 mean((X w + b - y)^2) at point = (w, b), by hand."""
    residual = inputs @ point[:4] + point[4] - targets.double()
    return torch.cat([inputs.T @ residual / len(targets), residual.mean().reshape(1)])


def backward(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    loss = 0.5 * (model(inputs).squeeze(1) - targets.double()).pow(2).mean()
    loss.backward()
    return loss


def wrapped(
    algorithm: str,
    server_role: ServerRole,
    make_optimizer,
    *,
    overlap: bool = False,
    run: dict[str, object] | None = None,
) -> tuple[nn.Module, ElasticOptimizer, InProcessServer]:
    model = linear_model(seed=1)  # not the server's init: the handshake must overwrite it
    server = InProcessServer(server_role, numel=5)
    optimizer = ElasticOptimizer(
        model,
        make_optimizer(model.parameters()),
        session_for(algorithm, **(run or {})),
        comm_period=TAU,
        overlap=overlap,
        transport=server,  # type: ignore[arg-type]
    )
    return model, optimizer, server


def run_steps(model: nn.Module, optimizer: ElasticOptimizer, data) -> None:
    for inputs, targets in data:
        optimizer.zero_grad()
        backward(model, inputs, targets)
        optimizer.step()


def test_easgd_with_sgd_and_weight_decay_follows_algorithm_1() -> None:
    alpha, decay = 0.4, 0.05
    center0 = flat(linear_model(seed=0))
    model, optimizer, server = wrapped(
        "easgd",
        ElasticServer(center0, moving_rate=alpha),
        lambda p: torch.optim.SGD(p, lr=LR, weight_decay=decay),
    )
    data = batches(STEPS)
    run_steps(model, optimizer, data)
    x, center = center0.clone(), center0.clone()
    for t, (inputs, targets) in enumerate(data):
        point = x.clone()  # the gradient (weight decay included) is taken before the move
        if t % TAU == 0:
            move = alpha * (x - center)
            x, center = x - move, center + move
        x = x - LR * (analytic_grad(point, inputs, targets) + decay * point)
    assert server.exchange_steps == [0, 3, 6, 9]
    assert torch.allclose(flat(model), x, rtol=0, atol=1e-12)
    assert torch.allclose(server.role.center, center, rtol=0, atol=1e-12)
    optimizer.close()


def test_eamsgd_with_torch_nesterov_sgd_follows_algorithm_2_moving_x_not_v() -> None:
    alpha, momentum = 0.3, 0.9
    center0 = flat(linear_model(seed=0))
    model, optimizer, server = wrapped(
        "eamsgd",
        ElasticServer(center0, moving_rate=alpha),
        lambda p: torch.optim.SGD(p, lr=LR, momentum=momentum, nesterov=True),
    )
    data = batches(STEPS)
    run_steps(model, optimizer, data)
    x, v, center = center0.clone(), torch.zeros(5, dtype=torch.float64), center0.clone()
    for t, (inputs, targets) in enumerate(data):
        point = x.clone()
        if t % TAU == 0:
            move = alpha * (x - center)
            x, center = x - move, center + move
        v = momentum * v - LR * analytic_grad(point + momentum * v, inputs, targets)
        x = x + v
    # torch keeps y = x + delta v in the parameters; the wrapper sends (and moves) x
    assert torch.allclose(flat(model), x + momentum * v, rtol=0, atol=1e-12)
    assert torch.allclose(optimizer.role.exchange_point(), x, rtol=0, atol=1e-12)  # type: ignore[attr-defined]
    assert torch.allclose(server.role.center, center, rtol=0, atol=1e-12)
    assert (x - flat(model)).abs().max() > 1e-3  # the correction mattered
    optimizer.close()


def test_downpour_with_sgd_pushes_accumulated_updates_and_pulls_before_the_gradient() -> None:
    center0 = flat(linear_model(seed=0))
    model, optimizer, server = wrapped(
        "downpour", DownpourServer(center0), lambda p: torch.optim.SGD(p, lr=LR)
    )
    data = batches(STEPS)
    run_steps(model, optimizer, data)
    x, accumulated, center = center0.clone(), torch.zeros(5, dtype=torch.float64), center0.clone()
    for t, (inputs, targets) in enumerate(data):
        if t % TAU == 0:
            center = center + accumulated
            x, accumulated = center.clone(), torch.zeros_like(accumulated)
        grad = analytic_grad(x, inputs, targets)
        x, accumulated = x - LR * grad, accumulated - LR * grad
    assert server.exchange_steps == [0, 3, 6, 9]
    assert torch.allclose(flat(model), x, rtol=0, atol=1e-12)
    assert torch.allclose(server.role.center, center, rtol=0, atol=1e-12)
    assert torch.allclose(optimizer.state_dict()["easgd"]["accumulated"], accumulated, atol=1e-12)
    optimizer.close()


def test_state_dict_resume_continues_exactly_where_the_run_left_off() -> None:
    def make(p):
        return torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True)

    center0 = flat(linear_model(seed=0))
    data = batches(STEPS)
    model, optimizer, server = wrapped("eamsgd", ElasticServer(center0, moving_rate=0.3), make)
    run_steps(model, optimizer, data)
    straight = flat(model)

    model, optimizer, server = wrapped("eamsgd", ElasticServer(center0, moving_rate=0.3), make)
    run_steps(model, optimizer, data[:5])
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    server_state = copy.deepcopy(server.role.state_dict())  # the server's own checkpoint
    role = ElasticServer(center0, moving_rate=0.3)
    role.load_state_dict(server_state)
    model, optimizer, server = wrapped("eamsgd", role, make)  # the restarted worker joins again
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.local_step_count == 5
    run_steps(model, optimizer, data[5:])
    assert server.exchange_steps == [6, 9]
    assert torch.allclose(flat(model), straight, rtol=0, atol=1e-12)


SNAPSHOT_CASES = {
    "eamsgd-nesterov": ("eamsgd", lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True)),
    "easgd-adam": ("easgd", lambda p: torch.optim.Adam(p, lr=LR)),
    "downpour-momentum": ("downpour", lambda p: torch.optim.SGD(p, lr=LR, momentum=0.5)),
}


def server_role_for(algorithm: str, center: Tensor) -> ServerRole:
    if algorithm == "downpour":
        return DownpourServer(center)
    return ElasticServer(center, moving_rate=0.3)


@pytest.mark.parametrize("case", list(SNAPSHOT_CASES))
def test_a_marked_reply_saves_the_state_sent_and_a_restart_resumes_from_it_exactly(
    tmp_path: Path, case: str
) -> None:
    algorithm, make = SNAPSHOT_CASES[case]
    center0, data = flat(linear_model(seed=0)), batches(STEPS)
    run = {"checkpoints": str(tmp_path), "snapshot": 0, "signature": {"algorithm": algorithm}}
    model, optimizer, server = wrapped(
        algorithm, server_role_for(algorithm, center0), make, run=run
    )
    run_steps(model, optimizer, data)
    straight, straight_center = flat(model), server.role.center.clone()

    model, optimizer, server = wrapped(
        algorithm, server_role_for(algorithm, center0), make, run=run
    )
    # the snapshot starts now: the exchange of t = 6 is its worker's part (DOWNPOUR sends it at
    # the end of step 5, before the gradient of step 6)
    before = 5 if algorithm == "downpour" else 6
    run_steps(model, optimizer, data[:before])
    server.mark_next = 7
    run_steps(model, optimizer, data[before:])  # then the worker crashes (no DONE)
    assert server.acks[-1] == 7  # its next message (t = 9) says its part is on disk
    assert optimizer.resumed_step == 0
    role = server_role_for(algorithm, center0)
    assert server.state_at_mark is not None
    role.load_state_dict(server.state_at_mark)  # the server resumes its part of snapshot 7
    resumed = {**run, "snapshot": 7}
    model, optimizer, server = wrapped(algorithm, role, make, run=resumed)
    assert optimizer.resumed_step == optimizer.local_step_count == 6  # no load_state_dict call
    run_steps(model, optimizer, data[6:])
    assert server.exchange_steps[0] == 6  # the marked exchange is redone, once
    assert torch.allclose(flat(model), straight, rtol=0, atol=1e-12)
    assert torch.allclose(server.role.center, straight_center, rtol=0, atol=1e-12)


def test_a_worker_part_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    run = {"checkpoints": str(tmp_path), "snapshot": 0, "signature": {"algorithm": "easgd"}}
    center0 = flat(linear_model(seed=0))
    make = SNAPSHOT_CASES["easgd-adam"][1]
    model, optimizer, server = wrapped(
        "easgd", ElasticServer(center0, moving_rate=0.3), make, run=run
    )
    server.mark_next = 2
    run_steps(model, optimizer, batches(4))
    other = {"checkpoints": str(tmp_path), "snapshot": 2, "signature": {"algorithm": "eamsgd"}}
    with pytest.raises(ValueError, match="algorithm: checkpoint 'easgd' vs this run 'eamsgd'"):
        wrapped("eamsgd", ElasticServer(center0, moving_rate=0.3), make, run=other)


def test_a_refused_exchange_resets_to_the_center_and_clears_the_optimizer_state() -> None:
    center0 = flat(linear_model(seed=0))
    model, optimizer, server = wrapped(
        "easgd",
        ElasticServer(center0, moving_rate=0.3),
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
    )
    data = batches(STEPS)
    run_steps(model, optimizer, data[:3])
    assert optimizer.state  # momentum buffers exist
    server.refuse_next = True
    center = server.role.center.clone()
    optimizer.zero_grad()
    backward(model, *data[3])
    optimizer.step()  # t = 3: the exchange is refused; the worker restarts from the center
    assert optimizer.loop.resets == 1
    assert not optimizer.state
    assert torch.equal(flat(model), center)


def test_the_server_stop_signal_reaches_should_stop() -> None:
    model, optimizer, server = wrapped(
        "easgd",
        ElasticServer(flat(linear_model(seed=0)), moving_rate=0.3),
        lambda p: torch.optim.SGD(p, lr=LR),
    )
    data = batches(STEPS)
    run_steps(model, optimizer, data[:2])
    assert not optimizer.should_stop
    server.stop = True
    run_steps(model, optimizer, data[2:4])  # t = 3 exchanges and hears the stop
    assert optimizer.should_stop


def test_overlap_mode_conserves_center_plus_worker_up_to_the_gradient_steps() -> None:
    center0 = flat(linear_model(seed=0))
    model, optimizer, server = wrapped(
        "easgd",
        ElasticServer(center0, moving_rate=0.3),
        lambda p: torch.optim.SGD(p, lr=LR),
        overlap=True,
    )
    gradient_sum = torch.zeros(5, dtype=torch.float64)
    for inputs, targets in batches(STEPS):
        optimizer.zero_grad()
        backward(model, inputs, targets)
        gradient_sum += torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
        optimizer.step()
    optimizer.close()  # waits for the exchange in flight and applies its move
    total = flat(model) + server.role.center
    assert len(server.exchange_steps) == 4
    assert torch.allclose(total, 2 * center0 - LR * gradient_sum, rtol=0, atol=1e-12)


def test_a_grad_scaler_step_is_wrapped_and_a_skipped_step_is_not_a_step() -> None:
    model = nn.Linear(4, 1)
    server = InProcessServer(ElasticServer(flat(model), moving_rate=0.3), numel=5)
    optimizer = ElasticOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=LR),
        session_for("easgd"),
        comm_period=1,
        transport=server,  # type: ignore[arg-type]
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    inputs = torch.randn(8, 4)
    for scale in (1.0, float("inf"), 1.0):
        optimizer.zero_grad()
        scaler.scale(model(inputs).pow(2).mean() * scale).backward()
        scaler.step(optimizer)
        scaler.update()
    assert optimizer.local_step_count == 2  # the inf step was skipped by the scaler
    assert server.exchange_steps == [0, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer.close()


def test_step_before_backward_names_the_fix() -> None:
    model, optimizer, _ = wrapped(
        "easgd",
        ElasticServer(flat(linear_model(seed=0)), moving_rate=0.3),
        lambda p: torch.optim.SGD(p, lr=LR),
    )
    with pytest.raises(RuntimeError, match=r"call loss\.backward\(\)"):
        optimizer.step()
    inputs, targets = batches(1)[0]
    backward(model, inputs, targets)
    optimizer.step()
    with pytest.raises(RuntimeError, match="without a new gradient"):
        optimizer.step()  # twice on one gradient


def test_a_model_of_another_size_or_dtype_than_the_servers_is_refused_before_training() -> None:
    model = linear_model(seed=0)

    def make(run: dict[str, object]) -> None:
        ElasticOptimizer(
            model,
            torch.optim.SGD(model.parameters(), lr=LR),
            session_for("easgd", **run),
            transport=InProcessServer(ElasticServer(torch.zeros(6), moving_rate=0.3), 5),  # type: ignore[arg-type]
        )

    with pytest.raises(ValueError, match=r"has 5 trainable parameters but the server's has 6"):
        make({"numel": 6})
    with pytest.raises(ValueError, match=r"same dtype on every rank"):
        make({"numel": 5, "dtype": "torch.float32"})
    with pytest.raises(ValueError, match="build the same model on every rank"):
        make({})  # no run description: the server's handshake refuses it


def test_an_optimizer_that_misses_trainable_parameters_is_refused() -> None:
    model = linear_model(seed=0)
    with pytest.raises(
        ValueError, match=r"does not hold the model's trainable parameters \['bias'\]"
    ):
        ElasticOptimizer(
            model, torch.optim.SGD([model.weight], lr=LR), session_for("easgd"), transport=None
        )


def test_a_bad_comm_period_or_overlap_with_downpour_is_refused_before_joining() -> None:
    model = linear_model(seed=0)
    never = InProcessServer(ElasticServer(flat(model), moving_rate=0.3), 5)
    never.send_control = None  # type: ignore[assignment,method-assign]  # must not be reached
    for algorithm, options, message in [
        ("easgd", {"comm_period": 0}, "comm_period"),
        ("downpour", {"overlap": True}, "overlap=True is for easgd/eamsgd only"),
    ]:
        with pytest.raises(ValueError, match=message):
            ElasticOptimizer(
                model,
                torch.optim.SGD(model.parameters(), lr=LR),
                session_for(algorithm),
                transport=never,  # type: ignore[arg-type]
                **options,  # type: ignore[arg-type]
            )


def test_join_refuses_backends_the_transport_cannot_serve_before_connecting() -> None:
    with pytest.raises(ValueError, match="use backend='gloo'"):
        join(backend="nccl")
    with pytest.raises(ValueError, match="allowed: auto, gloo"):
        join(backend="mpi")


def test_buffers_stay_local_and_only_trainable_parameters_travel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    model[2].bias.requires_grad_(False)
    numel = 4 * 3 + 3 + 3 + 3 + 3  # linear, batchnorm affine, linear weight (frozen bias stays)
    center = torch.randn(numel, dtype=torch.float64)
    server = InProcessServer(ElasticServer(center, moving_rate=0.5), numel)
    optimizer = ElasticOptimizer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR),
        session_for("easgd"),
        comm_period=1,
        transport=server,  # type: ignore[arg-type]
    )
    inputs = torch.randn(16, 4, dtype=torch.float64)
    optimizer.zero_grad()
    model(inputs).sum().backward()
    expected_mean = 0.1 * model[0](inputs).mean(0)  # momentum 0.1 from a zero running mean
    optimizer.step()
    assert torch.allclose(model[1].running_mean, expected_mean.detach(), atol=1e-12)
    assert int(model[1].num_batches_tracked) == 1
    assert server.role.center.numel() == numel


def test_a_learning_rate_schedule_on_the_wrapper_drives_the_wrapped_optimizer() -> None:
    model, optimizer, _ = wrapped(
        "easgd",
        ElasticServer(flat(linear_model(seed=0)), moving_rate=0.3),
        lambda p: torch.optim.SGD(p, lr=LR),
    )
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    run_steps(model, optimizer, batches(4))
    for _ in range(4):
        schedule.step()
    assert optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(LR / 4)


def test_an_exception_in_the_loop_tells_the_server_this_worker_failed() -> None:
    center0 = flat(linear_model(seed=0))
    model, optimizer, server = wrapped(
        "easgd", ElasticServer(center0, moving_rate=0.3), lambda p: torch.optim.SGD(p, lr=LR)
    )
    sent: list[Op] = []
    send = server.send
    server.send = lambda header, payload=None: (sent.append(header.op), send(header, payload))  # type: ignore[method-assign]
    with pytest.raises(KeyError), optimizer:
        run_steps(model, optimizer, batches(2))
        raise KeyError("a bug in the user's loop")
    assert sent[-1] == Op.FAILED
    with pytest.raises(RuntimeError, match="after optimizer.close"):
        optimizer.step()
