"""Checkpoints: atomic, checksummed, pruned; corrupt ones skipped; foreign ones refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from easgd.recovery.checkpoint import Checkpointer, CheckpointError, check_compatible


def state(value: float) -> dict:
    return {
        "role": {"center": torch.full((3,), value), "updates": int(value)},
        "signature": {"model": "mlp"},
    }


def test_save_and_load_round_trip_and_keep_the_last_k(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "server", keep=2)
    for value in (1.0, 2.0, 3.0):
        ckpt.save(state(value))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["server-00000001.pt", "server-00000002.pt"]
    path, loaded = ckpt.latest()  # type: ignore[misc]
    assert path.name == "server-00000002.pt"
    assert torch.equal(loaded["role"]["center"], torch.full((3,), 3.0))


def test_truncated_checkpoint_is_skipped_for_the_previous_good_one(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "worker1", keep=3)
    ckpt.save(state(1.0))
    newest = ckpt.save(state(2.0))
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    path, loaded = ckpt.latest()  # type: ignore[misc]
    assert path.name == "worker1-00000000.pt" and loaded["role"]["updates"] == 1


def test_bit_flip_fails_the_checksum(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "server")
    path = ckpt.save(state(5.0))
    wrapper = torch.load(path, weights_only=True)
    payload = bytearray(wrapper["payload"])
    payload[len(payload) // 2] ^= 0xFF
    wrapper["payload"] = bytes(payload)
    torch.save(wrapper, path)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        Checkpointer.read(path)
    assert ckpt.latest() is None


def test_no_temporary_file_is_left_behind_and_others_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    ckpt = Checkpointer(tmp_path, "server")
    ckpt.save(state(1.0))
    assert not list(tmp_path.glob(".*tmp"))
    assert Checkpointer(tmp_path, "worker1").latest() is None


def test_checkpoint_of_another_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"model: checkpoint 'mlp' vs this run 'lenet'.*checkpoint.resume=false",
    ):
        check_compatible(state(1.0), path=tmp_path / "x.pt", signature={"model": "lenet"})
    check_compatible(state(1.0), path=tmp_path / "x.pt", signature={"model": "mlp"})


def test_loading_never_executes_code(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    path = tmp_path / "server-00000000.pt"
    torch.save({"format": "easgd-checkpoint-1", "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="unreadable"):
        Checkpointer.read(path)


def test_numbered_snapshots_prune_to_the_committed_and_keep_newer_ones(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "worker2")
    for number in range(1, 8):
        ckpt.save(state(float(number)), number)
    ckpt.save_final(state(99.0))
    ckpt.prune([4, 6])  # committed: 4 and 6; 7 may still be committed, 5 never will be
    assert ckpt.numbers() == [4, 6, 7]
    loaded = ckpt.load(6)
    assert loaded is not None and loaded["role"]["updates"] == 6
    assert ckpt.load(5) is None
    final = ckpt.load_final()
    assert final is not None and final["role"]["updates"] == 99
