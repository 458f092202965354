"""Sharded checkpoints: save_quantized and export_compressed_tensors split the weights above max_shard_size,
the loaders read the shards back bitwise, and a missing, damaged, duplicated or foreign shard is refused."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sq_kernels as sq
from sq_kernels.checkpoint import QUANT_FILE, WEIGHTS_FILE, CheckpointError, parse_size, plan_shards
from sq_kernels.export import export_compressed_tensors, load_compressed_tensors

from conftest import calib_tokens
from conftest import logits as _logits, quantized as _quantized

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 40_000  # bytes: a tiny model's weights in several shards


def _shards(path):
    return sorted(p.name for p in path.glob("sq_model-*.safetensors"))


@pytest.mark.parametrize("family", ["llama", "mixtral", "opt"])
def test_sharded_round_trip_is_bitwise(family, tmp_path):
    model = _quantized(family)
    x = calib_tokens(2, 16, seed=3)
    sq.save_quantized(model, tmp_path / "one")
    sq.save_quantized(model, tmp_path / "many", max_shard_size=LIMIT, progress=False)
    shards = _shards(tmp_path / "many")
    assert len(shards) > 2 and not (tmp_path / "many" / WEIGHTS_FILE).exists()
    assert shards[0] == f"sq_model-00001-of-{len(shards):05d}.safetensors"
    meta = json.loads((tmp_path / "many" / QUANT_FILE).read_text())
    assert meta["format_version"] == 2 and "weights_file" not in meta
    assert [e["file"] for e in meta["shards"]] == shards and all(len(e["sha256"]) == 64 for e in meta["shards"])
    assert json.loads((tmp_path / "one" / QUANT_FILE).read_text())["format_version"] == 1  # unsharded: as before
    stored = {}
    for name in shards:
        part = load_file(str(tmp_path / "many" / name))
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= LIMIT or len(part) == 1, f"{name}: {size} bytes in {len(part)} tensors"
        assert not stored.keys() & part.keys()
        stored.update(part)
    single = load_file(str(tmp_path / "one" / WEIGHTS_FILE))
    assert stored.keys() == single.keys() and all(torch.equal(stored[k], single[k]) for k in single)
    loaded = sq.load_quantized(tmp_path / "many")
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_saving_again_replaces_the_earlier_shards(tmp_path):
    model = _quantized("llama")
    sq.save_quantized(model, tmp_path, max_shard_size=LIMIT, progress=False)
    many = _shards(tmp_path)
    sq.save_quantized(model, tmp_path, max_shard_size=2 * LIMIT, progress=False)
    fewer = _shards(tmp_path)
    assert 1 < len(fewer) < len(many) and all(name.endswith(f"-of-{len(fewer):05d}.safetensors") for name in fewer)
    sq.save_quantized(model, tmp_path)
    assert _shards(tmp_path) == [] and (tmp_path / WEIGHTS_FILE).is_file()
    (tmp_path / "notes.safetensors").write_bytes(b"the user's")  # not ours: left alone
    sq.save_quantized(model, tmp_path, max_shard_size=LIMIT, progress=False)
    assert not (tmp_path / WEIGHTS_FILE).exists() and (tmp_path / "notes.safetensors").read_bytes() == b"the user's"
    x = calib_tokens(2, 8, seed=5)
    assert torch.equal(_logits(sq.load_quantized(tmp_path), x), _logits(model, x))


@pytest.fixture
def sharded(tmp_path):
    sq.save_quantized(_quantized("llama"), tmp_path, max_shard_size=LIMIT, progress=False)
    return tmp_path


def test_missing_shard(sharded):
    shards = _shards(sharded)
    (sharded / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[1]} is missing \\({len(shards)} shards expected\\)"):
        sq.load_quantized(sharded)


def test_damaged_shard(sharded):
    name = _shards(sharded)[-1]
    data = bytearray((sharded / name).read_bytes())
    data[-3] ^= 0x55
    (sharded / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} is corrupt: its SHA-256 differs"):
        sq.load_quantized(sharded)


def test_tensor_in_two_shards(sharded):
    first, second = _shards(sharded)[:2]
    with safe_open(str(sharded / first), "pt") as f:
        meta = f.metadata()
    a, b = load_file(str(sharded / first)), load_file(str(sharded / second))
    key = next(iter(b))
    save_file({**a, key: b[key]}, str(sharded / first), metadata=meta)
    with pytest.raises(CheckpointError, match=f"{key} is stored twice, in {first} and {second}"):
        sq.load_quantized(sharded, verify=False)


def test_shard_of_another_checkpoint(sharded, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    sq.save_quantized(_quantized("llama", alpha=0.6), other, max_shard_size=LIMIT, progress=False)
    name = _shards(sharded)[0]
    (sharded / name).write_bytes((other / name).read_bytes())
    with pytest.raises(CheckpointError, match=f"{name} is corrupt: its SHA-256 differs"):
        sq.load_quantized(sharded)


@pytest.mark.parametrize("shards,message", [
    ([], "'shards' must be a non-empty list"),
    ("sq_model.safetensors", "'shards' must be a non-empty list"),
    ([{"sha256": None}], "'shards' must be a non-empty list"),
    ([{"file": "../x.safetensors"}], "'shards' must be a plain file name"),
    ([{"file": "a.safetensors"}, {"file": "a.safetensors"}], "names a file twice"),
    ([{"file": "a.safetensors", "sha256": 5}], "'sha256' must be the file's SHA-256"),
    ([{"file": "a.safetensors", "sha256": None}], "'sha256' must be the file's SHA-256"),
])
def test_bad_shard_lists(sharded, shards, message):
    meta = json.loads((sharded / QUANT_FILE).read_text())
    meta["shards"] = shards
    (sharded / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        sq.load_quantized(sharded)


def test_version_2_needs_its_shard_list(sharded):
    meta = json.loads((sharded / QUANT_FILE).read_text())
    del meta["shards"]
    (sharded / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing field 'shards'"):
        sq.load_quantized(sharded)


@pytest.mark.parametrize("size,expected", [("5GB", 5 * 10 ** 9), ("500MB", 5 * 10 ** 8), ("2GiB", 2 * 2 ** 30),
                                           ("1.5 gb", 1_500_000_000), ("100", 100), (4096, 4096), ("64KiB", 65536)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "GB", "", "-1GB", 0, -5, True, 2.5, None, "1e3GB5"])
def test_parse_size_refuses(size):
    with pytest.raises(ValueError, match="max_shard_size must be"):
        parse_size(size)


def test_bad_shard_size_changes_nothing(tmp_path):
    with pytest.raises(ValueError, match="max_shard_size must be"):
        sq.save_quantized(_quantized("llama"), tmp_path / "x", max_shard_size="lots")
    assert not (tmp_path / "x").exists()


def test_plan_shards_keeps_order_and_limit():
    sizes = {"a": 30, "b": 50, "c": 200, "d": 10, "e": 60, "f": 40}
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert plan_shards(sizes, 10 ** 9) == [list(sizes)]


def test_export_sharded_with_an_index(tmp_path):
    model = _quantized("llama")
    export_compressed_tensors(model, tmp_path / "one")
    export_compressed_tensors(model, tmp_path / "many", max_shard_size=LIMIT, progress=False)
    files = sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors"))
    assert len(files) > 2 and not (tmp_path / "many" / "model.safetensors").exists()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    single = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    x = calib_tokens(2, 16, seed=3)
    a, b = load_compressed_tensors(tmp_path / "one"), load_compressed_tensors(tmp_path / "many")
    assert torch.equal(_logits(a, x), _logits(b, x))
