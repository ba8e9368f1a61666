"""Example (a) without easgd: a LeNet-style 1-D CNN on MNIST-1D, one process.

    python examples/mnist1d_cnn_plain.py

examples/mnist1d_cnn.py is the same script trained with elastic averaging; compare the two with
``diff examples/mnist1d_cnn_plain.py examples/mnist1d_cnn.py`` to see what adopting easgd takes.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from easgd.data.mnist1d import load_mnist1d

EPOCHS = int(os.environ.get("EPOCHS", "6"))


def make_model() -> nn.Module:
    """LeNet's layout in one dimension: two convolution + pooling stages, two linear layers."""
    return nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(32 * 10, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    logits = model(inputs)
    return {
        "test_loss": F.cross_entropy(logits, targets).item(),
        "test_error": (logits.argmax(1) != targets).float().mean().item(),
    }


def main() -> None:
    torch.manual_seed(0)
    data = load_mnist1d()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    train = TensorDataset(data.train_x, data.train_y)
    loader = DataLoader(train, batch_size=64, shuffle=True, num_workers=2)
    for epoch in range(EPOCHS):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: train loss {loss.item():.3f}")
    print(f"test error: {evaluate(model, data.test_x, data.test_y)['test_error']:.3f}")


if __name__ == "__main__":
    main()
