"""The shared parts of every run: built once, the same way, for every topology and mode.

``assembly`` (RunParts, RunRecord, EvalCadence), ``build`` (data, model, device, transports from a
config), ``runlog`` (metrics.csv, TensorBoard, summary.json), ``summary`` (the one summary.json
shape), ``progress``, ``faults`` (the one fault injector), ``files`` (atomic writes) and
``preflight`` (checks before any process starts).
"""
