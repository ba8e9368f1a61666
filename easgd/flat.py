"""A model seen as one flat parameter vector: the form every update rule and message uses.

``FlatModel`` turns a point (1-D tensor of all parameters) into a minibatch loss and gradient,
and evaluates a point on a test set. Gradients include weight decay, as the spec requires.

Three ways to take a gradient: :meth:`FlatModel.stacked_loss_and_grad` (k points at once, one
``torch.func.vmap`` call, for the simulator's batched path), :meth:`FlatModel.loss_and_grad` (a float loss and one flat gradient,
for the simulator and the tests) and the hot path :meth:`FlatModel.gradient`, which returns the
loss as a device tensor (no host sync) and the gradient as the per-parameter tensors autograd
produced (no copy into a flat buffer). A worker role writes its look-ahead point straight into
:attr:`FlatModel.flat_params` (its scratch buffer), so loading the point costs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.utils import parameters_to_vector


class FlatModel:
    """Evaluate a classifier ``module`` at flat parameter vectors.

    The module's parameters are re-pointed to views of one flat buffer, :attr:`flat_params`, so
    loading a point is one copy (none when the point is written there directly). The flat
    gradient buffer of :meth:`loss_and_grad` is allocated on its first call only: the hot path,
    :meth:`gradient`, never needs it.
    """

    def __init__(self, module: nn.Module, *, weight_decay: float = 0.0) -> None:
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        self.weight_decay = weight_decay
        with torch.no_grad():
            self.flat_params = parameters_to_vector(self.params).detach().clone()
            for p, data in zip(self.params, self._views(self.flat_params), strict=True):
                p.data = data
            self._flat_grads: Tensor | None = None
            self._flat_pieces = [v.reshape(-1) for v in self._views(self.flat_params)]

    @property
    def flat_grads(self) -> Tensor:
        """The flat gradient buffer of :meth:`loss_and_grad` (allocated on first use)."""
        if self._flat_grads is None:
            self._flat_grads = torch.zeros_like(self.flat_params)
        return self._flat_grads

    def initial_point(self) -> Tensor:
        """The module's current parameters as one vector."""
        return self.flat_params.clone()

    def load(self, point: Tensor) -> None:
        """Write ``point`` into the module's parameters (nothing to do if it is already there)."""
        if point.numel() != self.num_params:
            raise ValueError(
                f"point has {point.numel()} values but the model has {self.num_params} parameters"
            )
        if point.data_ptr() == self.flat_params.data_ptr() and point.is_contiguous():
            return
        with torch.no_grad():
            self.flat_params.copy_(point.reshape(-1))

    def gradient(
        self, point: Tensor, inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """The hot path: (loss as a 0-d tensor on the model's device, gradient pieces).

        The pieces are each parameter's gradient viewed flat, in order (their concatenation is
        the flat gradient, weight decay included); they are valid until the next call. Pass
        :attr:`flat_params` itself as ``point`` (a role's scratch) to skip the load.
        """
        self.load(point)
        self.module.train()
        for p in self.params:
            p.grad = None  # autograd then hands over its fresh gradient: no zeroing, no adding
        loss = F.cross_entropy(self.module(inputs), targets)
        loss.backward()
        grads = [
            torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1)
            for p in self.params
        ]
        if self.weight_decay:
            torch._foreach_add_(grads, self._flat_pieces, alpha=self.weight_decay)
        return loss.detach(), grads

    def loss_and_grad(self, point: Tensor, inputs: Tensor, targets: Tensor) -> tuple[float, Tensor]:
        """Cross-entropy of the minibatch at ``point`` and its gradient (plus weight decay).

        The gradient returned is valid until the next call (it is the flat gradient buffer).
        """
        self.load(point)
        self.module.train()
        for p, view in zip(self.params, self._views(self.flat_grads), strict=True):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view  # after :meth:`gradient` handed the gradients to autograd
        self.flat_grads.zero_()
        loss = F.cross_entropy(self.module(inputs), targets)
        loss.backward()
        grad = self.flat_grads
        first = self.params[0].grad
        if first is None or first.data_ptr() != self.flat_grads.data_ptr():
            # autograd replaced the gradients instead of accumulating into our views: gather them
            grad = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
            for p, view in zip(self.params, self._views(self.flat_grads), strict=True):
                p.grad = view
        if self.weight_decay:
            grad = grad + self.weight_decay * point
        return float(loss.detach()), grad

    def batch_support(self, *, speed: bool = False) -> str | None:
        """None when :meth:`stacked_loss_and_grad` computes what k calls of :meth:`loss_and_grad`
        would; otherwise why not (state that a call changes, or randomness of its own).

        ``speed``: also None only when the batched call is expected to be faster here. On a CPU a
        batched convolution (oneDNN's grouped kernel) is slower than k single ones
        (benchmarks/sim_batched.py measured 0.7x for the MNIST-1D CNN), so it is refused there.
        """
        if any(True for _ in self.module.buffers()):
            return "the model has buffers (BatchNorm running statistics change at every step)"
        if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in self.module.modules()):
            return "the model has dropout (its masks come from the global generator, in order)"
        convolutions = (nn.modules.conv._ConvNd,)
        if (
            speed
            and self.flat_params.device.type == "cpu"
            and any(isinstance(m, convolutions) for m in self.module.modules())
        ):
            return (
                "on a CPU batched convolutions are slower than one call per worker "
                "(benchmarks/sim_batched.py); sim.batched=true uses them anyway"
            )
        return None

    def stacked_loss_and_grad(
        self, points: Tensor, inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Row j of the results is :meth:`loss_and_grad` of ``points[j]`` on minibatch
        ``(inputs[j], targets[j])``: losses (k,) and gradients (k, n), weight decay included.

        One ``vmap`` of ``grad_and_value`` over ``functional_call``: the k forward and backward
        passes run as batched kernels. Equal to the k single calls up to the kernels' summation
        order (bit for bit where the batched kernel sums in the same order, as a linear layer's
        matmul does on CPU; within float rounding otherwise, a grouped convolution for one).
        Only for modules with :meth:`batch_support` None.
        """
        count = points.shape[0]
        if points.shape != (count, self.num_params):
            raise ValueError(f"points must be (k, {self.num_params}), got {tuple(points.shape)}")
        stacked, offset = {}, 0
        for name, p in self._named_params():
            stacked[name] = points[:, offset : offset + p.numel()].reshape(count, *p.shape)
            offset += p.numel()
        module = self.module
        module.train()

        def loss_of(params: dict[str, Tensor], batch: Tensor, target: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(module, params, (batch,)), target)

        grads, losses = vmap(grad_and_value(loss_of))(stacked, inputs, targets)
        grad = torch.cat([grads[name].reshape(count, -1) for name in stacked], dim=1)
        if self.weight_decay:
            grad = grad + self.weight_decay * points
        return losses.detach(), grad.detach()

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of :attr:`params`, in their order."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into views shaped like each parameter."""
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    @torch.no_grad()
    def evaluate(
        self, point: Tensor, inputs: Tensor, targets: Tensor, *, batch_size: int = 1024
    ) -> dict[str, float]:
        """Mean cross-entropy and classification error of ``point`` on a labelled set."""
        self.load(point)
        self.module.eval()
        total_loss, wrong = 0.0, 0
        for start in range(0, len(targets), batch_size):
            logits = self.module(inputs[start : start + batch_size])
            target = targets[start : start + batch_size]
            total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
            wrong += int((logits.argmax(1) != target).sum())
        return {"test_loss": total_loss / len(targets), "test_error": wrong / len(targets)}

    # -- buffers (BatchNorm running statistics) ------------------------------------------------
    @property
    def norm_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The module's normalisation layers that keep running statistics (buffers)."""
        return [
            m
            for m in self.module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]

    @torch.no_grad()
    def recompute_running_stats(
        self, point: Tensor, inputs: Tensor, *, max_examples: int = 4096, batch_size: int = 512
    ) -> None:
        """Set the running statistics of every BatchNorm layer to those of ``point`` on ``inputs``.

        A flat point carries parameters only; the buffers that belong to it are recomputed here
        (an exact average over up to ``max_examples`` examples, as
        ``torch.optim.swa_utils.update_bn`` does), so that evaluating ``point`` in eval mode uses
        statistics of ``point`` itself rather than those of the initial weights.
        """
        layers = self.norm_layers
        if not layers:
            return
        self.load(point)
        momenta = [m.momentum for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the exact mean over the batches
        was_training = self.module.training
        self.module.train()
        subset = inputs[:max_examples]
        for start in range(0, len(subset), batch_size):
            self.module(subset[start : start + batch_size])
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        self.module.train(was_training)
