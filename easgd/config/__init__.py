"""Typed, documented configuration schemas (dataclasses), one module per config group."""
