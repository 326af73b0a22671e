"""The shard loader: partition across ranks/workers, seeded order, exact mid-epoch resume, corrupt shards."""

from __future__ import annotations

import io
import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from dnascale.data.loader import ResumableLoader, ShardDataset, seeded_permutation
from dnascale.errors import DataError

COUNTS = [7, 13, 1, 9, 10]  # uneven on purpose: shards straddle slot boundaries
TOTAL = sum(COUNTS)
WINDOW = 6
SOFTMASK_SHARD = 3


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _key(shard: int, i: int) -> str:
    return f"train_{shard:03d}_{i:09d}"


def _sample(shard: int, i: int, with_ids: bool = True) -> dict:
    # ids encode the sample's identity so a test can check which sample it got from the tensor alone.
    ids = np.array([shard, i, shard * 1000 + i, 1, 2, 3], dtype=np.uint16)
    meta = {"record": f"rec{shard}", "source": "fixture.fa", "start": i * WINDOW, "end": (i + 1) * WINDOW,
            "strand": "+", "species": "fixture"}  # fmt: skip
    sample = {"__key__": _key(shard, i), "meta.json": json.dumps(meta).encode()}
    if with_ids:
        sample["ids.npy"] = _npy(ids)
    if shard == SOFTMASK_SHARD:
        sample["softmask.npy"] = _npy(np.arange(WINDOW) % 2 == 0)
    return sample


def _shard_name(shard: int) -> str:
    return f"train-fixture-{shard:06d}.tar"


def write_shard(directory: Path, shard: int, count: int, missing_ids_at: int | None = None) -> None:
    """Write one shard in the shard builder's format with webdataset.ShardWriter (one shard per writer)."""
    pattern = str(directory / "train-fixture-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=10**6, start_shard=shard, verbose=0, encoder=False) as sink:
        for i in range(count):
            sink.write(_sample(shard, i, with_ids=i != missing_ids_at))


def make_dataset(directory: Path, counts: list[int] = COUNTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for shard, count in enumerate(counts):
        write_shard(directory, shard, count)
    shards = [{"path": _shard_name(s), "samples": c, "tokens": c * WINDOW, "sha256": ""} for s, c in enumerate(counts)]
    manifest = {
        "format": "dnascale-shards/1",
        "tokenizer": {"name": "nucleotide-char"},
        "splits": {"train": {"shards": shards}, "validation": {"shards": []}},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def all_keys(counts: list[int] = COUNTS) -> set[str]:
    return {_key(s, i) for s, c in enumerate(counts) for i in range(c)}


def collate(samples: list[dict]) -> dict:
    return {
        "ids": torch.stack([s["ids"] for s in samples]),
        "keys": [s["key"] for s in samples],
        "epoch": torch.tensor([s["epoch"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
    }


def take(loader: ResumableLoader, n: int) -> list[dict]:
    stream = iter(loader)
    batches = list(itertools.islice(stream, n))
    stream.close()  # shuts the DataLoader's workers down now rather than at garbage collection
    return batches


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["keys"] == b["keys"]
        for name in ("ids", "epoch", "index"):
            assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shards"))


def _dataset(directory: Path, **kw) -> ShardDataset:
    options = dict(rank=0, world_size=1, seed=17, shuffle=True, infinite=True)
    options.update(kw)
    return ShardDataset(directory, **options)


# ---------------------------------------------------------------------------------------------------------------
# Order and partition


def test_seeded_permutation_is_a_stable_permutation():
    perm = seeded_permutation(1000, 1, 2, 3)
    assert sorted(perm.tolist()) == list(range(1000))
    assert np.array_equal(perm, seeded_permutation(1000, 1, 2, 3))
    assert not np.array_equal(perm, seeded_permutation(1000, 1, 2, 4))
    # Pinned: a change of the order would silently break resuming existing checkpoints.
    assert seeded_permutation(8, 0, 0).tolist() == [0, 1, 6, 3, 5, 4, 2, 7]
    assert seeded_permutation(10, 1, 2, 3).tolist() == [0, 7, 5, 8, 3, 6, 9, 2, 1, 4]
    assert seeded_permutation(0, 5).tolist() == []


def test_one_epoch_two_ranks_two_workers_covers_everything_once(shard_dir):
    keys_by_index: dict[int, str] = {}
    for rank in (0, 1):
        dataset = _dataset(shard_dir, rank=rank, world_size=2, infinite=False)
        for batch in ResumableLoader(dataset, 3, collate, num_workers=2):
            for key, index in zip(batch["keys"], batch["index"].tolist()):
                assert index not in keys_by_index, f"index {index} delivered twice"
                keys_by_index[index] = key
    assert sorted(keys_by_index) == list(range(TOTAL))
    assert set(keys_by_index.values()) == all_keys()

    # The dataset alone under a plain DataLoader splits the same way (same global order, same indices).
    plain: dict[int, str] = {}
    for rank in (0, 1):
        dataset = _dataset(shard_dir, rank=rank, world_size=2, infinite=False)
        for sample in DataLoader(dataset, batch_size=None, num_workers=2):
            plain[sample["index"]] = sample["key"]
    assert plain == keys_by_index


def test_unshuffled_order_is_manifest_order(shard_dir):
    dataset = _dataset(shard_dir, shuffle=False, infinite=False)
    samples = list(dataset)
    assert [s["key"] for s in samples] == [_key(s, i) for s, c in enumerate(COUNTS) for i in range(c)]
    assert [s["index"] for s in samples] == list(range(TOTAL))
    first = samples[0]
    assert first["ids"].dtype == torch.long and first["ids"].tolist() == [0, 0, 0, 1, 2, 3]
    assert first["meta"]["start"] == 0 and first["epoch"] == 0 and "softmask" not in first
    masked = [s for s in samples if s["key"].startswith(f"train_{SOFTMASK_SHARD:03d}")]
    assert all(s["softmask"].dtype == torch.bool and s["softmask"].tolist()[:2] == [True, False] for s in masked)


def _epoch_keys(directory: Path, seed: int, epochs: int) -> list[list[str]]:
    stream = iter(_dataset(directory, seed=seed))
    samples = list(itertools.islice(stream, epochs * TOTAL))
    by_epoch = [[] for _ in range(epochs)]
    for s in sorted(samples, key=lambda s: (s["epoch"], s["index"])):
        by_epoch[s["epoch"]].append(s["key"])
    return by_epoch


def test_shuffle_is_seeded_per_epoch_and_keeps_shards_contiguous(shard_dir):
    epochs = _epoch_keys(shard_dir, seed=17, epochs=3)
    assert all(set(keys) == all_keys() and len(keys) == TOTAL for keys in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs == _epoch_keys(shard_dir, seed=17, epochs=3)
    assert epochs[0] != _epoch_keys(shard_dir, seed=18, epochs=1)[0]
    for keys in epochs:  # within an epoch a shard's samples occupy one contiguous run of indices
        shard_runs = [shard for shard, _ in itertools.groupby(k.split("_")[1] for k in keys)]
        assert len(shard_runs) == len(COUNTS)


# ---------------------------------------------------------------------------------------------------------------
# Exact resume


_BASELINES: dict[tuple, list[dict]] = {}


def _baseline(directory: Path, rank: int, batch_size: int, workers: int, n: int) -> list[dict]:
    key = (str(directory), rank, batch_size, workers)
    if len(_BASELINES.get(key, [])) < n:
        dataset = _dataset(directory, rank=rank, world_size=2)
        _BASELINES[key] = take(ResumableLoader(dataset, batch_size, collate, num_workers=workers), n)
    return _BASELINES[key][:n]


@pytest.mark.parametrize(
    "rank,batch_size,k",
    [(0, 3, 1), (1, 3, 4), (0, 3, 7), (1, 5, 4), (0, 5, 4), (1, 3, 0)],
)
def test_exact_resume_with_two_workers(shard_dir, rank, batch_size, k):
    m = 12  # enough to cross at least one epoch boundary after the resume point (20 samples per rank per epoch)
    want = _baseline(shard_dir, rank, batch_size, 2, k + m)
    assert want[-1]["epoch"].max() >= 1

    first = ResumableLoader(_dataset(shard_dir, rank=rank, world_size=2), batch_size, collate, num_workers=2)
    head = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip (checkpoint metadata)
    if batch_size == 5 and k == 4:  # each worker's 10-sample slot is used up exactly: resume lands on epoch 1
        assert [(w["epoch"], w["offset"]) for w in state["workers"]] == [(1, 0), (1, 0)]

    second = ResumableLoader(_dataset(shard_dir, rank=rank, world_size=2), batch_size, collate, num_workers=2)
    second.load_state_dict(state)
    tail = take(second, m)
    assert_same_batches(head + tail, want)
    assert all(len(b["keys"]) == batch_size for b in tail)  # infinite streams span epochs: batches stay full


def test_exact_resume_in_process(shard_dir):
    want = _baseline(shard_dir, 0, 4, 0, 14)
    first = ResumableLoader(_dataset(shard_dir, rank=0, world_size=2), 4, collate, num_workers=0)
    head = take(first, 6)
    second = ResumableLoader(_dataset(shard_dir, rank=0, world_size=2), 4, collate, num_workers=0)
    second.load_state_dict(first.state_dict())
    assert_same_batches(head + take(second, 8), want)


def test_iterating_again_continues_where_the_last_iterator_stopped(shard_dir):
    want = _baseline(shard_dir, 1, 3, 2, 9)
    loader = ResumableLoader(_dataset(shard_dir, rank=1, world_size=2), 3, collate, num_workers=2)
    assert_same_batches(take(loader, 4) + take(loader, 5), want)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_finite_resume_with_an_exhausted_worker_and_rewind(shard_dir):
    # 40 samples over 3 workers -> slots of 13, 13, 14; batch 13 -> worker 2 alone has a second batch.
    def loader() -> ResumableLoader:
        return ResumableLoader(_dataset(shard_dir, infinite=False), 13, collate, num_workers=3)

    full = list(loader())
    assert [len(b["keys"]) for b in full] == [13, 13, 13, 1]
    first = loader()
    head = take(first, 3)
    second = loader()
    second.load_state_dict(first.state_dict())
    assert_same_batches(head + list(second), full)
    assert_same_batches(list(second), full)  # a finished finite pass rewinds


def test_dataset_state_resumes_single_stream(shard_dir):
    full = list(itertools.islice(iter(_dataset(shard_dir)), 2 * TOTAL + 5))
    first = _dataset(shard_dir)
    head = list(itertools.islice(iter(first), TOTAL + 3))
    second = _dataset(shard_dir)
    second.load_state_dict(first.state_dict())
    tail = list(itertools.islice(iter(second), TOTAL + 2))
    assert [(s["key"], s["epoch"], s["index"]) for s in head + tail] == [
        (s["key"], s["epoch"], s["index"]) for s in full
    ]


def test_incompatible_state_is_refused(shard_dir, tmp_path):
    loader = ResumableLoader(_dataset(shard_dir, rank=0, world_size=2), 3, collate, num_workers=2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="world_size=2.*world_size=1.*not supported yet"):
        ResumableLoader(_dataset(shard_dir), 3, collate, num_workers=2).load_state_dict(state)
    with pytest.raises(DataError, match="num_workers=2.*num_workers=1"):
        ResumableLoader(_dataset(shard_dir, rank=0, world_size=2), 3, collate, num_workers=1).load_state_dict(state)
    with pytest.raises(DataError, match="rank=0.*rank=1"):
        ResumableLoader(_dataset(shard_dir, rank=1, world_size=2), 3, collate, num_workers=2).load_state_dict(state)
    other = make_dataset(tmp_path / "other", counts=[5, 6, 7, 8])
    with pytest.raises(DataError, match="another dataset"):
        ResumableLoader(_dataset(other, rank=0, world_size=2), 3, collate, num_workers=2).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        ResumableLoader(_dataset(shard_dir, rank=0, world_size=2, seed=3), 3, collate, 2).load_state_dict(state)
    with pytest.raises(DataError, match="not a loader state"):
        loader.load_state_dict({"epoch": 3})


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_too_few_samples_for_an_infinite_stream(tmp_path):
    directory = make_dataset(tmp_path / "tiny", counts=[2, 1])
    with pytest.raises(DataError, match=r"tiny.*3 samples cannot feed 4 streams"):
        ResumableLoader(_dataset(directory, rank=0, world_size=2), 1, collate, num_workers=2)
    # A finite pass is fine: some workers simply get nothing.
    batches = list(ResumableLoader(_dataset(directory, infinite=False), 1, collate, num_workers=4))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(all_keys([2, 1]))


# ---------------------------------------------------------------------------------------------------------------
# Corrupt shards

BAD = 1  # the 13-sample shard


def _corrupt(directory: Path, kind: str) -> None:
    path = directory / _shard_name(BAD)
    if kind == "truncated":  # cut inside a member
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 700])
    elif kind == "truncated_at_member":  # cut on a member boundary: tarfile sees a clean end, the count does not
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "missing":
        path.unlink()
    elif kind == "count":
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["splits"]["train"]["shards"][BAD]["samples"] = COUNTS[BAD] - 1
        (directory / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "no_ids":
        write_shard(directory, BAD, COUNTS[BAD], missing_ids_at=4)


CORRUPTIONS = {
    "truncated": "unreadable tar",
    "truncated_at_member": "has 8 samples, the manifest says 13",
    "garbage": "unreadable tar",
    "missing": "missing shard file",
    "count": "has 13 samples, the manifest says 12",
    "no_ids": "sample train_001_000000004 has no ids.npy",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_shard_raises_then_skips(tmp_path, caplog, kind):
    directory = make_dataset(tmp_path / "data")
    _corrupt(directory, kind)
    expected = f"shard {directory / _shard_name(BAD)}: {CORRUPTIONS[kind]}"
    with pytest.raises(DataError) as err:
        list(_dataset(directory, infinite=False))
    assert expected in str(err.value) and "\n" not in str(err.value)

    dataset = _dataset(directory, infinite=False, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="dnascale.data.loader"):
        keys = [s["key"] for s in dataset]
    assert dataset.skipped_shards == 1
    assert set(keys) == all_keys() - {_key(BAD, i) for i in range(COUNTS[BAD])}
    assert any(_shard_name(BAD) in r.getMessage() for r in caplog.records)


def test_worker_errors_reach_the_caller_as_one_line_data_errors(tmp_path):
    directory = make_dataset(tmp_path / "data")
    _corrupt(directory, "truncated")
    loader = ResumableLoader(_dataset(directory, infinite=False), 4, collate, num_workers=2)
    with pytest.raises(DataError, match=_shard_name(BAD)) as err:
        list(loader)
    assert "\n" not in str(err.value)


def test_skip_counts_through_workers_and_resumes_exactly(tmp_path):
    directory = make_dataset(tmp_path / "data")
    _corrupt(directory, "garbage")

    def loader() -> ResumableLoader:
        return ResumableLoader(_dataset(directory, on_corrupt="skip"), 4, collate, num_workers=2)

    want = take(loader(), 16)
    assert not any(k.startswith("train_001") for b in want for k in b["keys"])
    first = loader()
    head = take(first, 5)
    second = loader()
    second.load_state_dict(first.state_dict())
    assert_same_batches(head + take(second, 11), want)
    assert second.skipped_shards >= 2  # skipped once per epoch read (the stream is past epoch 1)


def test_checksum_verification_catches_silent_damage(tmp_path):
    directory = make_dataset(tmp_path / "data")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][BAD]["sha256"] = "0" * 64
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert len(list(_dataset(directory, infinite=False))) == TOTAL  # off by default
    with pytest.raises(DataError, match="sha256"):
        list(_dataset(directory, infinite=False, verify_checksums=True))


# ---------------------------------------------------------------------------------------------------------------
# Benchmark tool


def test_bench_loader_runs_on_fixture_shards(shard_dir, repo_root):
    script = repo_root / "tools" / "bench" / "bench_loader.py"
    result = subprocess.run(
        [sys.executable, str(script), str(shard_dir), "--batch-size", "4", "--workers", "1", "--seconds", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "samples/s" in result.stdout and "Mbp/s" in result.stdout
