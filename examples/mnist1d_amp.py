"""Example (b): example (a) in mixed precision on GPUs (autocast + GradScaler), elastic averaging.

    torchrun --standalone --nproc_per_node=3 examples/mnist1d_amp.py

Rank 0 holds the center (on the CPU); each worker trains on GPU ``local_rank % device_count``
(several workers may share one GPU). ``GradScaler.step`` calls the wrapper's ``step()`` only when
the gradients are finite, so a skipped step is not a step: t_i does not advance and no exchange
happens. Move the model to its device before wrapping the optimizer. Without CUDA it runs the same
loop on the CPU in bfloat16 (slow; for trying it out).
"""

import os

import torch
import torch.nn.functional as F
from mnist1d_cnn import evaluate, make_model
from torch.utils.data import DataLoader, TensorDataset

from easgd import api
from easgd.data.mnist1d import load_mnist1d

EPOCHS = int(os.environ.get("EPOCHS", "6"))
RUN_DIR = os.environ.get("RUN_DIR", "runs/mnist1d_amp")


def main() -> None:
    session = api.join()  # rank 0: the server; ranks 1..p: workers
    torch.manual_seed(0)
    data = load_mnist1d()
    model = make_model()
    if session.is_server:
        api.serve(
            model,
            session,
            evaluate=lambda m: evaluate(m, data.test_x, data.test_y),
            run_dir=RUN_DIR,
            eval_interval_s=1.0,
        )
        return session.close()
    if torch.cuda.is_available():
        device = torch.device("cuda", session.env.local_rank % torch.cuda.device_count())
        precision = torch.float16
    else:
        device, precision = torch.device("cpu"), torch.bfloat16
    model = model.to(device)  # before wrapping: the wrapper keeps the parameters' device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    optimizer = api.ElasticOptimizer(model, optimizer, session, comm_period=4)
    scaler = torch.amp.GradScaler(device.type)
    torch.manual_seed(session.env.rank)  # each worker its own shuffle
    train = TensorDataset(data.train_x, data.train_y)
    pin = device.type == "cuda"
    loader = DataLoader(train, batch_size=64, shuffle=True, num_workers=2, pin_memory=pin)
    for epoch in range(EPOCHS):
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=precision):
                loss = F.cross_entropy(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # unscale, then optimizer.step() if finite
            scaler.update()
            if optimizer.should_stop:
                break
        print(f"epoch {epoch}: train loss {loss.item():.3f}, scale {scaler.get_scale():g}")
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    print(f"test error: {evaluate(model, test_x, test_y)['test_error']:.3f}")
    print(f"local steps: {optimizer.local_step_count}")
    optimizer.close()
    session.close()


if __name__ == "__main__":
    main()
