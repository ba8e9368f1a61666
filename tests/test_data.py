"""Dataset loaders on small files written here in the standard formats, and their error messages."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from easgd.config.schema import DataConfig, ModelConfig
from easgd.data.cifar10 import load_cifar10
from easgd.data.digits import load_digits_split
from easgd.data.mnist import DatasetFileError, load_mnist
from easgd.data.sampling import MinibatchSampler
from easgd.data.synthetic import make_teacher_student
from easgd.parts.build import build_model, build_split


def write_idx(path: Path, array: np.ndarray, magic: int, *, compress: bool) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def make_mnist(root: Path, *, compress: bool, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    write_idx(
        root / "train-images-idx3-ubyte",
        rng.integers(0, 256, (n_train, 28, 28)),
        2051,
        compress=compress,
    )
    write_idx(
        root / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train), 2049, compress=compress
    )
    write_idx(
        root / "t10k-images-idx3-ubyte",
        rng.integers(0, 256, (n_test, 28, 28)),
        2051,
        compress=compress,
    )
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, 2049, compress=compress)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path: Path, compress: bool) -> None:
    make_mnist(tmp_path, compress=compress)
    split = load_mnist(tmp_path)
    assert split.train_x.shape == (12, 1, 28, 28) and split.test_x.shape == (5, 1, 28, 28)
    assert (
        split.train_x.dtype == torch.float32
        and split.train_x.min() >= 0
        and split.train_x.max() <= 1
    )
    assert split.test_y.tolist() == [0, 1, 2, 3, 4]


def test_mnist_missing_file_names_it(tmp_path: Path) -> None:
    make_mnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetFileError, match="t10k-labels-idx1-ubyte .*not found in"):
        load_mnist(tmp_path)


def test_mnist_wrong_magic_and_truncation_are_named(tmp_path: Path) -> None:
    make_mnist(tmp_path, compress=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    raw = labels.read_bytes()
    labels.write_bytes(struct.pack(">I", 2051) + raw[4:])
    with pytest.raises(DatasetFileError, match="magic number 2051, expected 2049"):
        load_mnist(tmp_path)
    labels.write_bytes(raw[:-3])
    with pytest.raises(DatasetFileError, match="truncated or corrupt"):
        load_mnist(tmp_path)


def write_cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"test batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def make_cifar(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 4, i)
    write_cifar_batch(folder / "test_batch", 3, 9)
    return folder


def test_cifar10_reads_python_batches(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    split = load_cifar10(tmp_path)  # the parent folder is accepted too
    assert split.train_x.shape == (20, 3, 32, 32) and split.test_x.shape == (3, 3, 32, 32)
    assert split.train_y.dtype == torch.int64 and len(split.train_y) == 20


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path)

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("this must never run",))

    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": Exploit(), b"labels": []}, handle, protocol=2)
    with pytest.raises(DatasetFileError, match=r"refusing to load (__builtin__|builtins)\.print"):
        load_cifar10(folder)


def test_cifar10_missing_and_malformed_batches_are_named(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetFileError, match="data_batch_3 not found"):
        load_cifar10(folder)
    write_cifar_batch(folder / "data_batch_3", 4, 3)
    (folder / "data_batch_2").write_bytes(b"\x80\x02}q\x00")  # a cut-off pickle
    with pytest.raises(DatasetFileError, match="data_batch_2 is not a valid CIFAR-10 python batch"):
        load_cifar10(folder)


def test_digits_split_is_fixed_by_its_seed() -> None:
    a, b, c = load_digits_split(seed=0), load_digits_split(seed=0), load_digits_split(seed=1)
    assert torch.equal(a.test_y, b.test_y) and not torch.equal(a.test_y, c.test_y)
    assert len(a.train_y) + len(a.test_y) == 1797 and a.num_classes == 10


def test_synthetic_task_scales_and_is_learnable_signal() -> None:
    split = make_teacher_student(num_samples=500, num_features=8, num_classes=3, seed=1)
    assert split.train_x.shape[1] == 8 and split.num_classes == 3
    counts = torch.bincount(split.train_y, minlength=3)
    assert (counts > 0).all()  # the teacher uses every class


def test_custom_dataset_through_target() -> None:
    split = build_split(
        DataConfig(name="custom", target="tests.test_data.tiny_datasets", kwargs={"n": 6})
    )
    assert split.train_x.shape == (6, 4) and split.num_classes == 2


def tiny_datasets(n: int) -> tuple:  # type: ignore[type-arg]
    data = [(torch.full((4,), float(i)), i % 2) for i in range(n)]
    return data, data[:2]


def test_shard_sampling_is_disjoint_and_whole_sampling_is_not() -> None:
    split = load_digits_split()
    shards = [
        MinibatchSampler(split, batch_size=8, worker_index=k, num_workers=3, mode="shard")
        for k in range(3)
    ]
    assert sum(len(s) for s in shards) == len(split.train_y)
    seen = [set(map(tuple, s.inputs.tolist())) for s in shards]
    assert not (seen[0] & seen[1])  # digits has no duplicate images across these shards
    whole = [
        MinibatchSampler(split, batch_size=8, worker_index=k, num_workers=3, seed=0)
        for k in range(2)
    ]
    assert len(whole[0]) == len(split.train_y)
    assert not torch.equal(whole[0].sample()[1], whole[1].sample()[1])  # own seed per worker


@pytest.mark.parametrize("name", ["mlp", "lenet", "cifar7"])
def test_every_model_fits_the_digits_images(name: str) -> None:
    split = load_digits_split()
    model = build_model(ModelConfig(name=name), split, seed=0)
    assert model(split.test_x[:5]).shape == (5, 10)


def test_mnist1d_is_the_standard_offline_split_and_its_disk_cache_gives_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from easgd.data import mnist1d
    from easgd.data.mnist1d import load_mnist1d

    monkeypatch.setenv("EASGD_CACHE_DIR", str(tmp_path))
    mnist1d._generate.cache_clear()  # generate here, whatever this process or folder holds
    state = np.random.get_state()
    split = load_mnist1d()
    assert np.array_equal(np.random.get_state()[1], state[1])  # the generator left numpy alone
    assert split.train_x.shape == (4000, 1, 40) and split.test_x.shape == (1000, 1, 40)
    assert split.num_classes == 10
    # 500 sequences per class in all (5,000 generated, shuffled, then cut 80/20)
    counts = torch.bincount(torch.cat([split.train_y, split.test_y]), minlength=10)
    assert counts.tolist() == [500] * 10
    # the generator standardises the whole set: mean 0, standard deviation 1
    everything = torch.cat([split.train_x, split.test_x]).double()
    assert abs(float(everything.mean())) < 1e-6 and abs(float(everything.std()) - 1) < 1e-3
    assert mnist1d.cache_file(5000, mnist1d.STANDARD_SEED).is_file()
    mnist1d._generate.cache_clear()
    again = load_mnist1d()  # read back from the file: the very same arrays
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, name), getattr(split, name)), name
    # a torn file is generated again, not trusted
    small = load_mnist1d(num_samples=100)
    path = mnist1d.cache_file(100, mnist1d.STANDARD_SEED)
    path.write_bytes(path.read_bytes()[:100])
    mnist1d._generate.cache_clear()
    assert torch.equal(load_mnist1d(num_samples=100).train_x, small.train_x)
    assert np.load(path)["x"].shape == (80, 40)


def test_train_subset_keeps_the_first_examples_and_the_whole_test_set() -> None:
    full = build_split(DataConfig(name="mnist1d"))
    small = build_split(DataConfig(name="mnist1d", train_subset=256))
    assert torch.equal(small.train_x, full.train_x[:256])
    assert torch.equal(small.test_x, full.test_x)
    with pytest.raises(ValueError, match=r"data.train_subset=5000 must be in \[1, 4000\]"):
        build_split(DataConfig(name="mnist1d", train_subset=5000))


def test_cnn1d_has_the_mnist1d_papers_layout() -> None:
    split = build_split(DataConfig(name="mnist1d"))
    model = build_model(ModelConfig(name="cnn1d"), split, seed=0)
    # length 40 -> 19 -> 10 -> 5 after the three stride-2 convolutions (k=5,3,3; padding 1)
    expected = (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (25 * 5 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 5210
    assert model(split.test_x[:7]).shape == (7, 10)
