"""Learning-rate schedules, gradient clipping and the optim.* keys: hand-computed values, the
spec's equations with eta_t, torch's clip_grad_norm_, and every bad value refused at config time."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from easgd.algorithms.clipping import clip_grad_norm_
from easgd.algorithms.schedules import LearningRateSchedule
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import OptimConfig, TrainConfig, validate
from easgd.data.digits import load_digits_split
from easgd.data.sampling import MinibatchSampler
from easgd.engine.allreduce import rank_worker, sampled_gradient
from easgd.flat import FlatModel
from easgd.parts.build import build_model
from easgd.roles import ElasticWorker, GradientFn, gradient_step, make_worker_role
from easgd.sim import ClassifierObjective, Quadratic, SimConfig, simulate
from tests.test_allreduce import run_loops

ETA = 0.1


def rates(schedule: LearningRateSchedule, steps: range) -> list[float]:
    return [schedule.learning_rate(t, learning_rate=ETA) for t in steps]


# -- each schedule against values computed by hand ------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "want"),
    [
        # warm-up W = 4: eta (t + 1) / 4, then eta
        (LearningRateSchedule(warmup_steps=4), [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]),
        # cosine over T = 4 to the floor 0: eta (1 + cos(pi t / 4)) / 2, then 0
        (
            LearningRateSchedule("cosine", 0, {"decay_steps": 4, "final_ratio": 0.0}),
            [0.1, 0.1 * (2 + 2**0.5) / 4, 0.05, 0.1 * (2 - 2**0.5) / 4, 0.0, 0.0],
        ),
        # cosine to the floor r = 0.2: eta (0.2 + 0.8 * (1 + cos(pi t / 2)) / 2)
        (
            LearningRateSchedule("cosine", 0, {"decay_steps": 2, "final_ratio": 0.2}),
            [0.1, 0.06, 0.02, 0.02, 0.02, 0.02],
        ),
        # warm-up W = 2, then cosine over T = 2: the decay starts when the warm-up ends
        (
            LearningRateSchedule("cosine", 2, {"decay_steps": 2, "final_ratio": 0.0}),
            [0.05, 0.1, 0.1, 0.05, 0.0, 0.0],
        ),
        # step: x 0.5 every 2 steps
        (
            LearningRateSchedule("step", 0, {"every": 2, "factor": 0.5}),
            [0.1, 0.1, 0.05, 0.05, 0.025, 0.025],
        ),
        # the authors' eta / (1 + t lrd)^lrp with lrd = 0.5, lrp = 2: 0.1 / (1, 2.25, 4, 6.25, 9, 12.25)
        (
            LearningRateSchedule("power", 0, {"decay_rate": 0.5, "decay_power": 2.0}),
            [0.1, 0.1 / 2.25, 0.025, 0.016, 0.1 / 9, 0.1 / 12.25],
        ),
        # lrp = 1 is Torch7's learningRateDecay: eta / (1 + t lrd), lrd = 1
        (
            LearningRateSchedule("power", 0, {"decay_rate": 1.0, "decay_power": 1.0}),
            [0.1, 0.05, 0.1 / 3, 0.025, 0.02, 0.1 / 6],
        ),
    ],
)
def test_each_schedule_matches_hand_computed_values(
    schedule: LearningRateSchedule, want: list[float]
) -> None:
    assert rates(schedule, range(6)) == pytest.approx(want, rel=1e-14, abs=1e-17)


def test_constant_schedule_is_eta_itself_and_is_stored_as_none() -> None:
    assert rates(LearningRateSchedule(), range(5)) == [ETA] * 5
    assert OptimConfig().schedule(100) is None
    role = make_worker_role(
        AlgorithmConfig("easgd", learning_rate=ETA, moving_rate=0.1),
        torch.zeros(3),
        comm_period=1,
        schedule=LearningRateSchedule("constant"),
    )
    assert role.schedule is None and role.learning_rate_now(ETA) == ETA


def test_config_builds_the_schedule_with_the_default_decay_length() -> None:
    optim = OptimConfig(lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    schedule = optim.schedule(steps_per_worker=110)
    assert schedule == LearningRateSchedule("cosine", 10, {"decay_steps": 100, "final_ratio": 0.1})
    # the floor is reached exactly at the last local step, t = steps_per_worker - 1 + 1
    assert schedule.learning_rate(110, learning_rate=1.0) == pytest.approx(0.1, rel=1e-15)
    assert (
        OptimConfig(lr_schedule="cosine", decay_steps=7).schedule(110).options["decay_steps"] == 7
    )  # type: ignore[union-attr]
    power = OptimConfig(lr_schedule="power", decay_rate=0.5, decay_power=2.0).schedule(5)
    assert power == LearningRateSchedule("power", 0, {"decay_rate": 0.5, "decay_power": 2.0})
    step = OptimConfig(lr_schedule="step", warmup_steps=2, step_every=3, step_factor=0.5)
    assert step.schedule(5) == LearningRateSchedule("step", 2, {"every": 3, "factor": 0.5})


def test_a_schedule_with_options_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="the step schedule's options"):
        LearningRateSchedule("step", 0, {"decay_steps": 3})
    with pytest.raises(ValueError, match="schedule kind='linear'; allowed: constant, cosine"):
        LearningRateSchedule("linear")


# -- worker steps with eta_t against the spec's equations, computed independently ----------------

CURVATURE = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
START = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
SCHEDULE = LearningRateSchedule("step", 3, {"every": 4, "factor": 0.5})


def spec_eamsgd(
    steps: int, *, p: int, tau: int, alpha: float, delta: float, offsets: list[float]
) -> tuple[list[Tensor], Tensor]:
    """Synchronous EAMSGD (Algorithm 2's local step, the spec's synchronous exchange) with eta_t."""
    workers = [START + offset for offset in offsets]
    velocities = [torch.zeros_like(START) for _ in range(p)]
    center = START.clone()
    for t in range(steps):
        eta_t = SCHEDULE.learning_rate(t, learning_rate=ETA)
        points = [x + delta * v for x, v in zip(workers, velocities, strict=True)]
        if t % tau == 0:  # every e_i reads the same center; the center gains their sum
            moves = [alpha * (x - center) for x in workers]
            workers = [x - e for x, e in zip(workers, moves, strict=True)]
            center = center + sum(moves)
        for i in range(p):  # the gradient at x + delta v, taken before the elastic move
            velocities[i] = delta * velocities[i] - eta_t * CURVATURE * points[i]
            workers[i] = workers[i] + velocities[i]
    return workers, center


@pytest.mark.parametrize(("name", "delta"), [("easgd", 0.0), ("eamsgd", 0.9)])
def test_elastic_workers_follow_the_spec_with_eta_t(name: str, delta: float) -> None:
    p, tau, alpha, steps = 2, 3, 0.2, 14
    config = AlgorithmConfig(name, learning_rate=ETA, momentum=delta, moving_rate=alpha)
    objective = Quadratic(START, curvature=CURVATURE)
    sim = SimConfig(
        num_workers=p, comm_period=tau, schedule="synchronous", duration=steps, lr_schedule=SCHEDULE
    )
    result = simulate(config, sim, objective)
    workers, center = spec_eamsgd(steps, p=p, tau=tau, alpha=alpha, delta=delta, offsets=[0.0, 0.0])
    assert torch.allclose(result.evaluated, center, rtol=0, atol=1e-13)
    for got, want in zip(result.workers, workers, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-13)
    constant = simulate(config, SimConfig(**{**sim.__dict__, "lr_schedule": None}), objective)
    assert not torch.allclose(constant.workers[0], workers[0], atol=1e-6)  # eta_t mattered


def test_downpour_worker_accumulates_eta_t_times_its_gradients() -> None:
    tau, steps = 3, 10
    config = AlgorithmConfig("downpour", learning_rate=ETA)
    sim = SimConfig(num_workers=1, comm_period=tau, duration=steps, lr_schedule=SCHEDULE)
    result = simulate(config, sim, Quadratic(START, curvature=CURVATURE))
    x, accumulated, center = START.clone(), torch.zeros(3, dtype=torch.float64), START.clone()
    for t in range(steps):
        if t % tau == 0:  # push a, pull the center
            center = center + accumulated
            x, accumulated = center.clone(), torch.zeros_like(accumulated)
        step = SCHEDULE.learning_rate(t, learning_rate=ETA) * CURVATURE * x
        x, accumulated = x - step, accumulated - step
    assert torch.allclose(result.workers[0], x, rtol=0, atol=1e-14)
    assert torch.allclose(result.evaluated, center, rtol=0, atol=1e-14)


def test_sequential_msgd_steps_with_eta_t() -> None:
    role = make_worker_role(
        AlgorithmConfig("msgd", learning_rate=ETA, momentum=0.5),
        START,
        comm_period=1,
        schedule=SCHEDULE,
    )
    x, v = START.clone(), torch.zeros(3, dtype=torch.float64)
    for t in range(9):
        gradient_step(role, lambda point: (0.0, CURVATURE * point))
        v = 0.5 * v - SCHEDULE.learning_rate(t, learning_rate=ETA) * CURVATURE * (x + 0.5 * v)
        x = x + v
    assert role.step == 9
    assert torch.allclose(role.params, x, rtol=0, atol=1e-15)


# -- clipping ---------------------------------------------------------------------------------


def gradient_pieces(scale: float) -> list[Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [
        scale * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in (7, 12, 1)
    ]


@pytest.mark.parametrize(("scale", "max_norm"), [(5.0, 1.0), (0.01, 1.0), (3.0, 2.5)])
def test_clipping_matches_torch_clip_grad_norm(scale: float, max_norm: float) -> None:
    pieces = gradient_pieces(scale)
    params = [nn.Parameter(torch.zeros_like(g)) for g in pieces]
    for param, grad in zip(params, pieces, strict=True):
        param.grad = grad.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = clip_grad_norm_(pieces, max_norm=max_norm)
    assert float(norm) == pytest.approx(float(want_norm), rel=1e-14)
    for got, param in zip(pieces, params, strict=True):
        assert torch.allclose(got, param.grad, rtol=1e-14, atol=0)  # type: ignore[arg-type]
    clipped = float(torch.linalg.vector_norm(torch.cat(pieces)))
    assert clipped == pytest.approx(min(float(norm), max_norm), rel=1e-6)


def test_flat_and_piecewise_gradients_are_clipped_bit_for_bit_alike() -> None:
    pieces = [g.float() for g in gradient_pieces(4.0)]
    flat = torch.cat(pieces)
    clip_grad_norm_(pieces, max_norm=1.5)
    clip_grad_norm_(flat, max_norm=1.5)
    assert torch.equal(torch.cat(pieces), flat)


def test_gradient_step_clips_the_gradient_with_weight_decay_before_the_step() -> None:
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    flat = FlatModel(module, weight_decay=0.5)
    inputs, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    start = flat.initial_point()
    role = make_worker_role(
        AlgorithmConfig("sgd", learning_rate=ETA), start, comm_period=1, max_grad_norm=0.05
    )
    gradient_step(role, lambda point: flat.gradient(point, inputs, targets))
    # independently: autograd's gradient at the start, plus weight decay, then torch's clipping
    reference = nn.Linear(4, 3)
    torch.nn.utils.vector_to_parameters(start, reference.parameters())
    nn.functional.cross_entropy(reference(inputs), targets).backward()
    for param in reference.parameters():
        param.grad += 0.5 * param.detach()  # type: ignore[operator]
    norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.05)
    assert float(norm) > 0.05  # the clip was active
    want = start - ETA * torch.cat([q.grad.reshape(-1) for q in reference.parameters()])  # type: ignore[union-attr]
    assert torch.allclose(role.params, want, rtol=0, atol=1e-7)


# -- bad values, refused before anything runs --------------------------------------------------


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        (
            {"lr_schedule": "linear"},
            "optim.lr_schedule='linear'; allowed: constant, cosine, step, power",
        ),
        ({"warmup_steps": -1}, "optim.warmup_steps=-1; allowed: an integer >= 0"),
        ({"decay_steps": 0}, "optim.decay_steps=0; allowed: an integer >= 1, or null"),
        ({"min_lr_ratio": 1.5}, "optim.min_lr_ratio=1.5; allowed: [0, 1]"),
        ({"step_every": 0}, "optim.step_every=0; allowed: an integer >= 1"),
        ({"step_factor": 0.0}, "optim.step_factor=0.0; allowed: (0, 1]"),
        ({"step_factor": 2.0}, "optim.step_factor=2.0; allowed: (0, 1]"),
        ({"decay_rate": -0.1}, "optim.decay_rate=-0.1; allowed: a finite number >= 0"),
        ({"decay_power": math.inf}, "optim.decay_power=inf; allowed: a finite number >= 0"),
        ({"clip_grad_norm": 0.0}, "optim.clip_grad_norm=0.0; allowed: a finite number > 0"),
        ({"clip_grad_norm": -1.0}, "optim.clip_grad_norm=-1.0; allowed: a finite number > 0"),
        ({"precision": "fp16"}, "optim.precision='fp16'; allowed: fp32, bf16"),
    ],
)
def test_every_bad_optim_value_is_refused_with_its_key(optim: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        validate(OmegaConf.create({"optim": optim}))
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {
                "algorithm": {"name": "mdownpour", "momentum": 0.9},
                "comm": {"period": 1},
                "optim": {"lr_schedule": "cosine"},
            },
            "optim.lr_schedule='cosine' (warmup_steps=0) acts on a worker's local step",
        ),
        (
            {
                "algorithm": {"name": "mdownpour", "momentum": 0.9},
                "comm": {"period": 1},
                "optim": {"warmup_steps": 5},
            },
            "optim.lr_schedule='constant' (warmup_steps=5) acts on a worker's local step",
        ),
        (
            {"steps_per_worker": 10, "optim": {"lr_schedule": "cosine", "warmup_steps": 10}},
            "optim.warmup_steps=10 leaves no step of steps_per_worker=10 for the cosine decay",
        ),
        (
            {"device": "cpu", "optim": {"precision": "bf16"}},
            "optim.precision=bf16 is CUDA autocast and device=cpu",
        ),
        (
            {"mode": "simulate", "optim": {"precision": "bf16"}},
            "optim.precision=bf16 is CUDA autocast and mode=simulate (CPU)",
        ),
    ],
)
def test_optim_values_this_run_cannot_honour_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        validate(OmegaConf.create(overrides))
    assert str(err.value).startswith(message)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_bf16_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="optim.precision=bf16 needs a CUDA GPU with bf16"):
        TrainConfig(optim=OptimConfig(precision="bf16"))


def test_mdownpour_role_refuses_a_schedule_but_takes_clipping() -> None:
    config = AlgorithmConfig("mdownpour", learning_rate=ETA, momentum=0.9)
    role = make_worker_role(config, START, comm_period=1, max_grad_norm=1.0)
    assert role.max_grad_norm == 1.0
    with pytest.raises(ValueError, match="MDOWNPOUR's gradient step is the server's"):
        make_worker_role(config, START, comm_period=1, schedule=SCHEDULE)


# -- the runtime's ranks and the simulator agree bit for bit with a schedule and clipping -------


@pytest.mark.parametrize("name", ["easgd", "eamsgd"])
def test_runtime_ranks_with_schedule_and_clipping_match_the_simulator_bit_for_bit(
    name: str,
) -> None:
    # the runtime takes per-parameter gradient pieces (and, for EASGD, keeps x_i in the model's
    # own parameters); the simulator takes flat gradients at copies: eta_t and the clipping
    # coefficient must come out the same in both
    split = load_digits_split(test_fraction=0.2, seed=0)
    model_config = TrainConfig().model
    momentum = 0.9 if name == "eamsgd" else 0.0
    config = AlgorithmConfig(name=name, learning_rate=0.05, momentum=momentum, moving_rate=0.2)
    schedule = LearningRateSchedule("cosine", 3, {"decay_steps": 8, "final_ratio": 0.1})
    p, tau, steps, clip = 2, 3, 13, 0.05

    def rank(index: int) -> tuple[ElasticWorker, GradientFn]:
        model = FlatModel(build_model(model_config, split, seed=0))
        role = rank_worker(config, model, comm_period=tau)
        role.set_local_step(schedule=schedule, max_grad_norm=clip)
        stream = MinibatchSampler(split, batch_size=128, worker_index=index, num_workers=p)
        return role, sampled_gradient(model, stream)

    ranks = [rank(index) for index in range(p)]
    start = ranks[0][0].params.clone()
    loops = run_loops(ranks, start, moving_rate=0.2, steps=steps)
    objective = ClassifierObjective(build_model(model_config, split, seed=0), split)
    sim = SimConfig(
        num_workers=p,
        comm_period=tau,
        schedule="synchronous",
        duration=steps,
        lr_schedule=schedule,
        max_grad_norm=clip,
    )
    result = simulate(config, sim, objective)
    for loop, want in zip(loops, result.workers, strict=True):
        assert torch.equal(loop.center, result.evaluated)
        assert torch.equal(loop.role.params, want)
    plain = simulate(config, SimConfig(**{**sim.__dict__, "max_grad_norm": None}), objective)
    assert not torch.equal(plain.workers[0], result.workers[0])  # the clip was active


@pytest.mark.slow
def test_killed_and_resumed_torchrun_job_with_schedule_and_clipping_equals_the_simulator(
    tmp_path: Path,
) -> None:
    # eta_t is a function of t_i alone: a rank restarted from a snapshot resumes t_i and so the
    # schedule where it left off; the whole job then equals the uninterrupted simulation
    from easgd.recovery.checkpoint import Checkpointer
    from easgd.recovery.snapshot import SnapshotLog
    from tests.test_train_e2e import run

    steps, tau = 60, 4
    settings = {"lr_schedule": "step", "warmup_steps": 8, "step_every": 16, "step_factor": 0.5}
    settings["clip_grad_norm"] = 0.05
    optim = OptimConfig(**settings)  # type: ignore[arg-type]
    overrides = [f"optim.{key}={value}" for key, value in settings.items()]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run(
        [*launch, "--max-restarts=1", "-m", "easgd.train", "topology=allreduce", "workers=2",
         f"steps_per_worker={steps}", f"comm.period={tau}", "checkpoint.every_s=0.0001",
         "fault.kill_rank=1", "fault.kill_at_step=40", "fault.kill_after_commit=true",
         "progress=false", "tensorboard=false", f"hydra.run.dir={tmp_path}", *overrides]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 1 and 0 < summary["details"]["resumed_step"] < steps
    directory = tmp_path / "checkpoints"
    final = Checkpointer(directory, "rank0").load(SnapshotLog(directory).committed()[-1])
    assert final is not None and final["role"]["step"] == steps
    split = load_digits_split(test_fraction=0.2, seed=0)
    sim = SimConfig(
        num_workers=2,
        comm_period=tau,
        schedule="synchronous",
        duration=steps,
        lr_schedule=optim.schedule(steps),
        max_grad_norm=optim.clip_grad_norm,
    )
    config = AlgorithmConfig(name="eamsgd", learning_rate=0.01, momentum=0.99)
    want = simulate(
        config, sim, ClassifierObjective(build_model(TrainConfig().model, split, seed=0), split)
    )
    assert torch.equal(final["center"], want.evaluated)
    assert torch.equal(final["role"]["params"], want.workers[0])
