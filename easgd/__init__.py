"""easgd: Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015) for PyTorch.

Layers, from the math outwards: ``algorithms`` (pure update rules), ``roles`` (each algorithm's
worker and server state), ``sim`` (single-process simulator on a virtual clock), ``comm``
(torch.distributed transport), ``runtime`` (server and worker processes), ``train`` (the Hydra
entry point launched by torchrun).
"""

__version__ = "0.1.0"
