"""The loader: layout facts of the real checkpoints, layout detection, repo roots, hub ids, and the
errors a user gets for a bad folder."""

import json
import shutil

import pytest
import torch
from conftest import small_config
from safetensors.torch import save_file

import gptoss.load
from gptoss import get_preset, load_model
from gptoss.checkpoint import CheckpointError, disk_spec, open_checkpoint
from gptoss.checkpoint_write import _shard, _shard_names
from gptoss.synthetic import random_model, write_checkpoint


def test_tensor_counts_and_shapes_of_the_real_checkpoints():
    # Shapes from the spec (section 3). Counts: HF 3 + 19 per layer (459 for 20b, 687 for 120b);
    # original 3 + 15 per layer = 363 for 20b, the entries of the published original/dtypes.json.
    # (The spec's "2 + 1 + 24 x 16 = 387" overcounts: its own table lists 15 tensors per block.)
    s20, s120 = get_preset("gpt-oss-20b"), get_preset("gpt-oss-120b")
    original = disk_spec(s20, "original")
    assert len(original) == 363 and len(disk_spec(s20, "hf-mxfp4")) == 459 and len(disk_spec(s120, "hf-mxfp4")) == 687
    assert original["block.0.attn.qkv.weight"] == ((5120, 2880), "BF16")
    assert original["block.23.mlp.mlp1_weight.blocks"] == ((32, 5760, 90, 16), "U8")
    assert original["block.23.mlp.mlp2_weight.scales"] == ((32, 2880, 90), "U8")
    assert original["unembedding.weight"] == ((201088, 2880), "BF16")
    hf = disk_spec(s20, "hf-mxfp4")
    assert hf["model.layers.0.self_attn.o_proj.weight"] == ((2880, 4096), "BF16")
    assert hf["model.layers.0.mlp.experts.gate_up_proj_scales"] == ((32, 5760, 90), "U8")
    dense = disk_spec(s20, "hf-bf16")  # HF dequantized experts are [E, in, out]
    assert dense["model.layers.0.mlp.experts.gate_up_proj"] == ((32, 2880, 5760), "BF16")
    assert dense["model.layers.0.mlp.experts.down_proj"] == ((32, 2880, 2880), "BF16")


def test_shard_naming_of_the_real_checkpoints():
    spec = disk_spec(get_preset("gpt-oss-20b"), "hf-mxfp4")
    shards = _shard(spec, int(4.8e9))
    assert _shard_names("hf-mxfp4", len(shards)) == [f"model-0000{i}-of-00002.safetensors" for i in range(3)]
    assert _shard_names("original", 7)[0] == "model--00001-of-00007.safetensors"
    assert _shard_names("original", 1) == ["model.safetensors"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    config = small_config()
    for layout in ("original", "hf-mxfp4", "hf-bf16"):
        write_checkpoint(root / layout, config, layout, seed=5, max_shard_bytes=150_000)
    return root


@pytest.mark.parametrize("layout", ["original", "hf-mxfp4", "hf-bf16"])
def test_detects_each_layout_and_files_are_valid_safetensors(checkpoints, layout):
    from safetensors import safe_open

    config, found, index = open_checkpoint(checkpoints / layout)
    assert found == layout and config == small_config()
    expected = disk_spec(config, layout)
    seen = {}
    for file in sorted((checkpoints / layout).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:  # the safetensors library reads what we streamed
            for name in f.keys():
                seen[name] = (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
    assert seen == expected


def test_one_seed_is_one_model_in_every_layout(checkpoints):
    ids = torch.randint(0, 300, (1, 11))
    logits = [load_model(checkpoints / lay, dtype=torch.float32)(ids) for lay in ("original", "hf-mxfp4", "hf-bf16")]
    assert torch.equal(logits[0], logits[1])
    assert torch.allclose(logits[0], logits[2], atol=1e-5)  # dense experts: another summation order


def test_a_model_drawn_in_memory_is_the_checkpoint_of_its_seed(checkpoints):
    """random_model (what the full-size benchmarks build on the GPU, no checkpoint on disk) holds on the
    CPU exactly the tensors load_model reads from write_checkpoint's files: names, dtypes and values."""
    loaded = load_model(checkpoints / "hf-mxfp4").state_dict()
    drawn = random_model(small_config(), seed=5).state_dict()
    assert loaded.keys() == drawn.keys()
    for name, tensor in loaded.items():
        assert drawn[name].dtype == tensor.dtype and torch.equal(drawn[name], tensor), name
    other = random_model(small_config(), seed=6).state_dict()
    assert not torch.equal(
        other["model.layers.0.mlp.experts.down_proj_blocks"], drawn["model.layers.0.mlp.experts.down_proj_blocks"]
    )


def test_experts_stay_mxfp4_and_bf16_is_not_copied(checkpoints):
    model = load_model(checkpoints / "hf-mxfp4")  # default dtype bf16
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and not hasattr(experts, "gate_up_proj")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


def test_dequantize_at_load_holds_dense_experts_and_changes_no_logit(checkpoints):
    ids = torch.randint(0, 300, (2, 9))
    mxfp4_model = load_model(checkpoints / "hf-mxfp4")
    dense_model = load_model(checkpoints / "hf-mxfp4", dequantize=True)
    experts = dense_model.model.layers[0].mlp.experts
    assert not hasattr(experts, "gate_up_proj_blocks") and not experts.quantized
    assert experts.gate_up_proj.dtype == torch.bfloat16 and not experts.gate_up_proj.requires_grad
    assert experts.gate_up_proj.shape == (7, 2 * 64, 96)  # [E, 2I, D], as the MXFP4 blocks are oriented
    # MXFP4 decodes exactly into bf16, and both paths run the same matmuls on the same weights
    assert torch.equal(mxfp4_model(ids), dense_model(ids))
    with pytest.raises(ValueError, match="needs MXFP4 experts"):
        load_model(checkpoints / "hf-mxfp4", dequantize=True, backend="triton")


def test_dequantize_auto_follows_the_free_memory(checkpoints, monkeypatch):
    folder = checkpoints / "hf-mxfp4"
    monkeypatch.setattr(gptoss.load, "available_memory", lambda: 10**12)
    assert not load_model(folder, dequantize="auto").model.layers[0].mlp.experts.quantized
    need = gptoss.load.dense_experts_bytes(small_config())
    monkeypatch.setattr(gptoss.load, "available_memory", lambda: need)  # would take all of it, not half
    assert load_model(folder, dequantize="auto").model.layers[0].mlp.experts.quantized
    with pytest.raises(ValueError, match="dequantize must be True, False or 'auto'"):
        load_model(folder, dequantize="yes")


def test_repo_root_with_original_folder(checkpoints, tmp_path):
    # A downloaded HF repo: HF MXFP4 weights at the root and OpenAI's under original/.
    root = tmp_path / "repo"
    shutil.copytree(checkpoints / "hf-mxfp4", root)
    shutil.copytree(checkpoints / "original", root / "original")
    assert open_checkpoint(root)[1] == "hf-mxfp4"
    only_original = tmp_path / "only-original"
    only_original.mkdir()
    (only_original / "README.md").write_text("weights under original/")
    shutil.copytree(checkpoints / "original", only_original / "original")
    assert open_checkpoint(only_original)[1] == "original"


def test_hub_id_downloads_only_what_is_needed(checkpoints, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(checkpoints / "hf-mxfp4")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model = load_model("openai/gpt-oss-20b", dtype=torch.float32)
    assert model.config == small_config()
    ((repo, patterns),) = calls
    assert repo == "openai/gpt-oss-20b"
    import fnmatch

    wanted = ["config.json", "model.safetensors.index.json", "model-00000-of-00002.safetensors"]
    unwanted = ["original/model.safetensors", "metal/model.bin", "original/config.json"]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in patterns)


def test_hub_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not download openai/gpt-oss-20b.*pass the local folder"):
        load_model("openai/gpt-oss-20b")


# --- bad folders: each gets one clear sentence -------------------------------------------------


def _copy(checkpoints, tmp_path, layout="hf-mxfp4"):
    return shutil.copytree(checkpoints / layout, tmp_path / layout)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_missing_config(checkpoints, tmp_path):
    folder = _copy(checkpoints, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(folder)


def test_truncated_shard(checkpoints, tmp_path):
    folder = _copy(checkpoints, tmp_path, "original")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{shard.name}.*truncated or corrupt; re-download"):
        load_model(folder)


def test_missing_shard_listed_in_index(checkpoints, tmp_path):
    folder = _copy(checkpoints, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"):
        load_model(folder)


def test_foreign_checkpoint(tmp_path):
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="does not hold a gpt-oss checkpoint"):
        load_model(tmp_path)


def test_foreign_config_beside_gpt_oss_weights(checkpoints, tmp_path):
    folder = _copy(checkpoints, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="'llama' model, not gpt-oss"):
        load_model(folder)


def _rewrite(folder, name, tensor):
    """Replace one tensor inside its (single-file) checkpoint."""
    from safetensors.torch import load_file

    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    tensors[name] = tensor
    save_file(tensors, str(file))


@pytest.fixture
def single_file(tmp_path):
    folder = tmp_path / "single"
    write_checkpoint(folder, small_config(), "original", seed=1)
    return folder


def test_wrong_shape_names_tensor_file_expected_and_found(single_file):
    _rewrite(single_file, "block.1.attn.sinks", torch.zeros(5, dtype=torch.bfloat16))
    with pytest.raises(
        CheckpointError, match=r"tensor block.1.attn.sinks in model.safetensors: expected shape \[6\], found \[5\]"
    ):
        load_model(single_file)


def test_wrong_dtype(single_file):
    _rewrite(single_file, "block.0.mlp.mlp1_weight.scales", torch.zeros(7, 128, 3, dtype=torch.int32))
    with pytest.raises(
        CheckpointError, match="block.0.mlp.mlp1_weight.scales in model.safetensors: expected dtype U8, found I32"
    ):
        load_model(single_file)


def test_missing_tensor(single_file):
    from safetensors.torch import load_file

    tensors = load_file(str(single_file / "model.safetensors"))
    del tensors["block.2.mlp.gate.bias"]
    save_file(tensors, str(single_file / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor block.2.mlp.gate.bias missing from the original checkpoint"):
        load_model(single_file)


def test_config_that_does_not_match_the_weights(checkpoints, tmp_path):
    folder = _copy(checkpoints, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="expected shape .* does config.json belong to these weights"):
        load_model(folder)


def test_backend_and_adapter_arguments(checkpoints):
    with pytest.raises(ValueError, match="backend must be one of"):
        load_model(checkpoints / "hf-mxfp4", backend="cuda")
    assert load_model(checkpoints / "hf-mxfp4", backend="torch").backend == "torch"
    with pytest.raises(FileNotFoundError, match="adapter folder some/folder does not exist"):
        load_model(checkpoints / "hf-mxfp4", adapter="some/folder")
    assert gptoss.load.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("layout", ["original", "hf-mxfp4", "hf-bf16"])
def test_the_layout_map_read_both_ways_gives_back_every_tensor(layout):
    # the writer's direction (disk_from_canonical) then the reader's (canonical_from_disk), on the one map
    from gptoss import mxfp4
    from gptoss.checkpoint import canonical_from_disk, canonical_spec, disk_from_canonical
    from gptoss.synthetic import _random_tensor

    config = small_config(hidden_size=64, intermediate_size=96)
    canon = {n: _random_tensor(n, shape, config, 5) for n, (shape, _) in canonical_spec(config).items()}
    producers = disk_from_canonical(config, layout, {n: (lambda t=t: t) for n, t in canon.items()})
    disk = {}
    for name, producer in producers.items():
        made = producer()
        disk[name] = made if isinstance(made, torch.Tensor) else torch.cat(list(made))
    spec = disk_spec(config, layout)
    assert list(disk) == list(spec) and all(tuple(disk[n].shape) == spec[n][0] for n in spec)
    back = dict(canonical_from_disk(config, layout, disk.__getitem__))
    for name, tensor in canon.items():
        if layout == "hf-bf16" and name.endswith("_scales"):
            continue
        if layout == "hf-bf16" and name.endswith("_blocks"):
            dense = mxfp4.dequantize(tensor, canon[name.replace("_blocks", "_scales")], torch.bfloat16)
            assert torch.equal(back[name.removesuffix("_blocks")], dense), name
        else:
            assert torch.equal(back[name], tensor), name
