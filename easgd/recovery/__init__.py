"""Recovery: one snapshot protocol (the marker cut of one server, the barrier cut of a sharded
center, the all-reduce's synchronous parts, the own-loop API's marker cut) over one commit log,
checkpoint files, resume, and the conservation audit.
"""
