"""The distributed runtime: the parameter server, the worker loop, process entry and launch."""
