"""The exchange engine: the parameter server (serving and guarding), its supervisor (evaluation,
stop rules, liveness, snapshot hosting), the worker loop, and the all-reduce loop with a
replicated center. Topologies compose these; they know no learning rate (the roles do).
"""
