"""easgd: Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015) for PyTorch.

Layers, from the math outwards: ``algorithms`` (pure update rules and the algorithm registry),
``roles`` (each algorithm's worker and server state), ``sim`` (single-process simulator on a
virtual clock), ``comm`` (torch.distributed transport), ``parts`` (what every run builds the same
way: data, model, run log, stop rules, faults, summary), ``engine`` (parameter server, supervisor,
worker loop, all-reduce loop), ``recovery`` (one snapshot protocol, checkpoints, resume, audit),
``topologies`` (one module per way of running, and their registry), ``api`` (your own loop),
``train`` (the Hydra entry point launched by torchrun).
"""

__version__ = "0.1.0"
