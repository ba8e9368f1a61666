"""Compressed exchanges: the codec, its refusals, error feedback, and conservation through real roles."""

from __future__ import annotations

import pytest
import torch

from easgd.comm import compression
from easgd.comm.compression import (
    FORMATS,
    INT8_BLOCK,
    Codec,
    Compression,
    IncrementSender,
    WireError,
    payload_bytes,
)
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import CheckpointConfig, CommConfig, TrainConfig
from easgd.roles import MDownpourServer, make_server_role, make_worker_role
from easgd.roles.links import ServerLink, compression_of
from easgd.sim import Quadratic, SimConfig, Simulator, simulate
from easgd.sim.cost import ExchangeCost, exchange_cost, message_bytes

EPS32 = 2.0**-24


def test_bytes_per_message_by_hand() -> None:
    # prefix 8 bytes; int8: 4 scales of 4 bytes for 1000 values (256 per block) + 1000 bytes
    assert payload_bytes("int8", 1000) == 8 + 4 * 4 + 1000
    assert payload_bytes("bf16", 1000) == 8 + 2000
    assert payload_bytes("fp16", 1000) == 8 + 2000
    assert payload_bytes("none", 1000) == 8 + 4000
    for name in FORMATS:
        assert Codec(name, 1000).encode(torch.randn(1000)).numel() == payload_bytes(name, 1000)


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_error_within_format_bound(name: str) -> None:
    values = torch.randn(3 * INT8_BLOCK + 17, generator=torch.Generator().manual_seed(0))
    values[5] = 40.0  # an outlier costs resolution to its own block only
    decoded = Codec(name, values.numel()).decode(Codec(name, values.numel()).encode(values))
    error = (decoded - values).abs()
    if name == "none":
        assert torch.equal(decoded, values)
    elif name == "bf16":
        assert bool((error <= values.abs() * 2.0**-8).all())
    elif name == "fp16":
        assert bool((error <= values.abs() * 2.0**-11 + 2.0**-25).all())
    else:
        blocks = torch.nn.functional.pad(values, (0, 4 * INT8_BLOCK - values.numel()))
        scale = blocks.view(4, INT8_BLOCK).abs().amax(dim=1) / 127
        bound = scale.repeat_interleave(INT8_BLOCK)[: values.numel()] * (0.5 + 1e-6)
        assert bool((error <= bound).all())
        assert float(error[INT8_BLOCK:].max()) < 0.02  # other blocks keep their resolution


def test_int8_zero_and_non_finite_blocks() -> None:
    values = torch.zeros(2 * INT8_BLOCK)
    values[INT8_BLOCK + 3] = float("nan")
    codec = Codec("int8", values.numel())
    decoded = codec.decode(codec.encode(values))
    assert torch.equal(decoded[:INT8_BLOCK], torch.zeros(INT8_BLOCK))
    assert bool(decoded[INT8_BLOCK:].isnan().all())  # the guard still sees the divergence


def test_wrong_format_size_or_dtype_is_refused() -> None:
    values = torch.randn(300)
    with pytest.raises(WireError, match="format bf16, this link expects int8"):
        Codec("int8", 300).decode(Codec("bf16", 300).encode(values))
    with pytest.raises(WireError, match="message of 200 values"):
        Codec("bf16", 300).decode(Codec("bf16", 200).encode(values[:200]))
    with pytest.raises(WireError, match="in 607 bytes"):
        Codec("bf16", 300).decode(Codec("bf16", 300).encode(values)[:-1])
    with pytest.raises(WireError, match="flat uint8"):
        Codec("bf16", 300).decode(values)
    with pytest.raises(WireError, match="cannot encode 200 values"):
        Codec("bf16", 300).encode(values[:200])
    with pytest.raises(ValueError, match="comm.compression='int4'; allowed: none, bf16"):
        CommConfig(compression="int4")
    with pytest.raises(ValueError, match="comm.error_feedback must be true or false"):
        CommConfig(error_feedback="yes")  # type: ignore[arg-type]
    int8 = CommConfig(compression="int8")
    with pytest.raises(ValueError, match="comm.compression=int8 runs with topology=server"):
        TrainConfig(comm=int8, topology="allreduce")
    with pytest.raises(ValueError, match="checkpoint.ledger sums the pushes sent"):
        TrainConfig(
            comm=int8,
            algorithm=AlgorithmConfig("downpour"),
            checkpoint=CheckpointConfig(ledger=True),
        )


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8"])
def test_error_feedback_sum_of_decoded_is_sum_of_true_up_to_last_residual(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    sender = IncrementSender(Codec(name, 700), error_feedback=True)
    true_sum = torch.zeros(700, dtype=torch.float64)
    decoded_sum = torch.zeros(700, dtype=torch.float64)
    largest = 0.0
    steps = 40
    for _ in range(steps):
        true = torch.randn(700, generator=generator) * 1e-3
        assert sender.residual is not None
        largest = max(largest, float((true + sender.residual).abs().max()))
        _, decoded = sender.encode(true)
        true_sum += true.double()
        decoded_sum += decoded.double()
    assert sender.residual is not None
    gap = decoded_sum - (true_sum - sender.residual.double())
    # residual = target - decoded is exact (Sterbenz: decoded is within a factor 2 of target, or
    # 0); only target = true + residual rounds, by <= 2^-24 |target| per message
    assert float(gap.abs().max()) <= steps * EPS32 * largest
    # without error feedback the rounding accumulates: the gap is the sum of every message's
    plain = IncrementSender(Codec(name, 700), error_feedback=False)
    assert plain.residual is None


def _cluster(config: AlgorithmConfig, name: str, error_feedback: bool, seed: int, workers: int):
    """A float64 server, ``workers`` worker roles and their two ends of each link."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(600, generator=generator, dtype=torch.float64)
    server = make_server_role(config, start, num_workers=workers)
    roles = [make_worker_role(config, start, comm_period=1) for _ in range(workers)]
    compression = compression_of(config, name, error_feedback, start.numel())
    worker_links = [compression.worker_link(start) for _ in roles]
    server_links = [ServerLink(compression, start) for _ in roles]
    return generator, start, server, roles, worker_links, server_links


def _drive(config: AlgorithmConfig, name: str, error_feedback: bool, rounds: int = 12):
    """p = 3 workers exchanging through links with a server, float64 variables; yields after
    each exchange (server role, worker roles, links, worker index, worker reply, server reply)."""
    generator, _, server, workers, worker_links, server_links = _cluster(
        config, name, error_feedback, 2, 3
    )
    for _ in range(rounds):
        for index, role in enumerate(workers):
            wire = worker_links[index].send(role.outgoing())
            before = server.center.clone(), [w.params.clone() for w in workers]
            reply_wire = server_links[index].handle(server, index, wire)
            reply = worker_links[index].receive(reply_wire)
            role.incoming(reply)
            yield server, workers, before, worker_links[index], server_links[index], reply
            grad = torch.randn(600, generator=generator, dtype=torch.float64)
            role.local_step(grad)


@pytest.mark.parametrize("error_feedback", [True, False])
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("algorithm", ["easgd", "eamsgd"])
def test_elastic_exchange_conserves_center_plus_workers(
    algorithm: str, name: str, error_feedback: bool
) -> None:
    config = AlgorithmConfig(algorithm, learning_rate=0.05, momentum=0.9 * (algorithm == "eamsgd"))
    for server, workers, before, worker_link, server_link, reply in _drive(
        config, name, error_feedback
    ):
        # both ends applied the same decoded bits, and hold the same x^_i
        assert torch.equal(server_link._reply, reply.double())
        assert torch.equal(server_link.up_state.reference, worker_link.up_state.reference)
        old = before[0] + sum(before[1])
        new = server.center + sum(w.params for w in workers)
        # two float64 roundings (center + e^, x_i - e^) per element, each <= 2^-53 |operand|
        scale = before[0].abs() + sum(x.abs() for x in before[1]) + reply.double().abs()
        assert bool(((new - old).abs() <= 4 * 2.0**-53 * scale).all())


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8"])
def test_downpour_center_is_start_plus_true_pushes_minus_residuals(name: str) -> None:
    config = AlgorithmConfig("downpour", learning_rate=0.05)
    generator, start, server, workers, worker_links, server_links = _cluster(
        config, name, True, 3, 2
    )
    pushed = torch.zeros(600, dtype=torch.float64)
    for _ in range(10):
        for index, role in enumerate(workers):
            role.local_step(torch.randn(600, generator=generator, dtype=torch.float64))
            pushed += role.outgoing()
            wire = worker_links[index].send(role.outgoing())
            role.incoming(
                worker_links[index].receive(server_links[index].handle(server, index, wire))
            )
            # the worker pulled the center as the server last sent it to this worker
            assert torch.equal(role.params, server_links[index].down_state.reference.double())
    residuals = sum(link.up_increment.residual.double() for link in worker_links)
    expected = start + pushed - residuals
    assert float((server.center - expected).abs().max()) <= 20 * EPS32 * float(
        pushed.abs().max() + 1
    )


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_mdownpour_lookahead_reply_is_a_delta(name: str) -> None:
    config = AlgorithmConfig("mdownpour", learning_rate=0.05, momentum=0.9)
    start = torch.randn(600, generator=torch.Generator().manual_seed(4))
    server = MDownpourServer(start, learning_rate=0.05, momentum=0.9)
    worker = make_worker_role(config, start, comm_period=1)
    compression = compression_of(config, name, True, start.numel())
    worker_link, server_link = compression.worker_link(start), ServerLink(compression, start)
    for _ in range(8):
        worker.local_step(torch.randn(600) * 0.1)
        wire = worker_link.send(worker.outgoing())
        worker.incoming(worker_link.receive(server_link.handle(server, 0, wire)))
        lookahead = server.center + server.momentum * server.velocity
        # the worker holds the look-ahead to within one delta's rounding
        assert (
            float((worker.params - lookahead).abs().max())
            <= 0.02 * float(server.velocity.abs().max() + 1e-12) + 1e-6
        )


# -- the simulator charges and applies what is sent ---------------------------------------------


def test_cost_charges_compressed_bytes_by_hand() -> None:
    # int8, 1000 values: prefix 8 + 4 scales * 4 + 1000 bytes + 64-byte header = 1088 bytes
    # = 8704 bits; at 1 Gb/s that is 8.704 us, and a step of 1 ms makes it 0.008704 steps
    assert message_bytes(1000, "int8") == 1088
    assert message_bytes(1000, "bf16") == 8 + 2000 + 64
    assert message_bytes(1000) == 4064  # float32 unchanged
    charges = exchange_cost(
        latency_s=0.0,
        bandwidth_gbps=1.0,
        service_s=0.0,
        num_params=1000,
        step_time_s=1e-3,
        compression="int8",
    )
    assert charges.transfer == pytest.approx(8704e-9 / 1e-3, rel=1e-12)


class _Recording:
    """A quadratic whose gradients are summed per worker (for the conservation check)."""

    def __init__(self, objective: Quadratic) -> None:
        self.objective = objective
        self.gradient_sum = torch.zeros_like(objective.initial_point())

    def initial_point(self) -> torch.Tensor:
        return self.objective.initial_point()

    def gradient(
        self, point: torch.Tensor, generator: torch.Generator
    ) -> tuple[float, torch.Tensor]:
        loss, grad = self.objective.gradient(point, generator)
        self.gradient_sum += grad
        return loss, grad

    def evaluate(self, point: torch.Tensor) -> dict[str, float]:
        return self.objective.evaluate(point)


@pytest.mark.parametrize("name", FORMATS)
def test_simulated_compressed_easgd_conserves_center_plus_workers(name: str) -> None:
    start = torch.linspace(-2, 2, 700, dtype=torch.float64)
    objective = _Recording(
        Quadratic(start, curvature=torch.ones(700, dtype=torch.float64), noise_std=0.3)
    )
    sim = SimConfig(
        num_workers=3,
        comm_period=2,
        duration=60.0,
        cost=ExchangeCost(latency=0.5, transfer=0.25, service=1.0),
        compression=name,
    )
    config = AlgorithmConfig("easgd", learning_rate=0.05)
    result = Simulator(config, sim, objective).run()
    total = result.evaluated + sum(result.workers)
    # local steps move sum x_i by -eta * sum g; exchanges move nothing but float64 rounding
    expected = 4 * start - 0.05 * objective.gradient_sum
    assert float((total - expected).abs().max()) < 1e-12
    assert result.exchanges > 40


def test_simulated_compression_applies_the_codec_and_tracks_float32() -> None:
    start = torch.linspace(-2, 2, 700, dtype=torch.float64)
    runs = {}
    for name in ("none", "bf16", "int8"):
        objective = Quadratic(start, curvature=torch.ones(700, dtype=torch.float64), noise_std=0.3)
        sim = SimConfig(
            num_workers=3, comm_period=2, duration=80.0, schedule="round_robin", compression=name
        )
        runs[name] = simulate(
            AlgorithmConfig("easgd", learning_rate=0.05), sim, objective
        ).evaluated
    for name in ("bf16", "int8"):
        gap = float((runs[name] - runs["none"]).abs().max())
        assert 0 < gap < 0.05  # the codec is applied, and the center stays near float32's
    with pytest.raises(ValueError, match="comm.compression is simulated on the asynchronous"):
        SimConfig(schedule="synchronous", compression="int8")


def _held_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_server_memory_per_worker_is_what_the_docs_say(error_feedback: bool) -> None:
    # elastic: x^_i (4 B) + reply buffer (4 B) + the residual of e^ with error feedback (4 B);
    # DOWNPOUR: the center this worker last received (4 B) + reply buffer (4 B); plus the
    # transport's receive buffer of the compressed message (int8: 1 + 4/256 B)
    numel = 2560
    start = torch.zeros(numel)
    elastic = ServerLink(Compression("int8", error_feedback, True, numel), start)
    held = _held_bytes(elastic.up_state.reference, elastic._reply, elastic.down_increment.residual)
    assert held == (12 if error_feedback else 8) * numel
    downpour = ServerLink(Compression("int8", error_feedback, False, numel), start)
    assert _held_bytes(downpour.down_state.reference, downpour._reply) == 8 * numel
    assert payload_bytes("int8", numel) == numel + 4 * 10 + 8
    # and the reply's own message buffer, kept across exchanges (the transport's receive buffer
    # is the other): + 2 * 1.016 bytes per parameter with int8
    assert _held_bytes(elastic.message) == _held_bytes(downpour.down_state.wire)
    assert _held_bytes(elastic.message) == payload_bytes("int8", numel)


@pytest.mark.parametrize("name", FORMATS)
def test_frames_decode_like_one_message_and_refuse_a_short_one(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = torch.randn(5 * INT8_BLOCK + 17, generator=torch.Generator().manual_seed(3))
    whole = Codec(name, values.numel())
    assert len(whole.frames) == 1
    monkeypatch.setattr(compression, "FRAME_VALUES", 2 * INT8_BLOCK)
    framed = Codec(name, values.numel())
    assert [f.values for f in framed.frames] == [slice(0, 512), slice(512, 1024), slice(1024, 1297)]
    # every byte in exactly one piece, frame 0's piece holding the prefix; same size as one frame
    pieces = torch.cat([torch.arange(framed.wire_bytes)[f.piece] for f in framed.frames])
    assert torch.equal(pieces, torch.arange(framed.wire_bytes))
    wire = framed.encode(values)
    assert wire.numel() == payload_bytes(name, values.numel()) == whole.wire_bytes
    # each block's scale (int8) is the same whichever frame holds it: the values decode alike
    assert torch.equal(framed.decode(wire), whole.decode(whole.encode(values)))
    out = torch.empty(values.numel())
    assert framed.decode(wire, out=out) is out
    with pytest.raises(WireError, match=f"in {wire.numel() - 1} bytes"):
        framed.decode(wire[:-1])


def test_senders_reuse_their_buffers() -> None:
    codec = Codec("int8", 1000)
    sender = IncrementSender(codec, error_feedback=True)
    first, decoded = sender.encode(torch.randn(1000))
    second, again = sender.encode(torch.randn(1000))
    assert first.data_ptr() == second.data_ptr() and decoded.data_ptr() == again.data_ptr()
    values = torch.randn(1000)
    expected = codec.decode(IncrementSender(codec, error_feedback=False).encode(values)[0])
    _, in_place = IncrementSender(codec, error_feedback=False).encode(values, decoded=values)
    assert in_place is values and torch.equal(values, expected)
