"""The own-loop API with compressed exchanges (api.serve(compression=...)), run by a test:

    torchrun --standalone --nproc_per_node=3 tests/compressed_own_loop.py int8

Workers fit y = x[:, :2] with a linear model; rank 0 prints the center's loss before and after.
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from easgd import api


def main() -> None:
    session = api.join()
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    inputs = torch.randn(256, 8)
    targets = inputs[:, :2]

    def loss_of(m: nn.Module) -> float:
        with torch.no_grad():
            return F.mse_loss(m(inputs), targets).item()

    if session.is_server:
        before = loss_of(model)
        api.serve(model, session, compression=sys.argv[1], eval_interval_s=10.0, tensorboard=False)
        print(f"center loss {before:.6f} -> {loss_of(model):.6f}")
        return session.close()
    optimizer = api.ElasticOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), session, comm_period=2
    )
    link = optimizer.loop.transport.link  # type: ignore[attr-defined]
    print(f"worker link: {type(link).__name__} {link.codec.name}")
    generator = torch.Generator().manual_seed(session.env.rank)
    for _ in range(150):
        batch = torch.randint(0, 256, (32,), generator=generator)
        optimizer.zero_grad()
        F.mse_loss(model(inputs[batch]), targets[batch]).backward()
        optimizer.step()
    optimizer.close()
    session.close()


if __name__ == "__main__":
    main()
