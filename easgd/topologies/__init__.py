"""One module per way of running, each declaring only which ranks play which role and how they
exchange: ``server`` (+ ``worker``), ``sharded``, ``allreduce``, ``sequential``, ``simulate``.

``registry`` picks a process's topology (one registration per topology); ``launch`` starts the
processes (under torchrun, or through torch's elastic launch API).
"""
