"""Hugging Face interop and `python -m launch.convert`, checked against transformers itself.

Small LlamaForCausalLM models are built by transformers from random configs (GQA, MQA and full
attention; tied and untied embeddings; vocabularies that are not powers of two; with and without
Llama 3 RoPE scaling), their weights randomized (norm gains too, so a swapped norm cannot hide), and
saved with save_pretrained. trichip must reproduce transformers' logits on both frameworks, and what
trichip exports must load back into transformers with the same tensors and logits.
"""
import dataclasses
import json
import shlex
import shutil

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, UserError, make_backend
from launch import convert
from models import hf
from models.spec import SIZES, LlamaConfig, RopeScaling, param_shapes
from trainer import checkpoint
from tests.conftest import cli, compose, train

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
HF_CONFIGS = {
    "gqa-untied": dict(vocab_size=301, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied-llama3": dict(vocab_size=259, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=True,
                            rope_theta=500000.0, rope_scaling=LLAMA3),
    "mqa-untied-llama3": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                              rope_theta=500000.0, rope_scaling=LLAMA3, rms_norm_eps=1e-5),
    "gqa-tied": dict(vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
SEQ = 40
ATOL = 1e-5


def expected_config(kw: dict) -> LlamaConfig:
    """The LlamaConfig trichip must read from a transformers config built with `kw`."""
    rs = kw.get("rope_scaling")
    return LlamaConfig(
        vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"], intermediate_size=kw["intermediate_size"],
        num_hidden_layers=kw["num_hidden_layers"], num_attention_heads=kw["num_attention_heads"],
        num_key_value_heads=kw["num_key_value_heads"], max_position_embeddings=128,
        rope_theta=kw.get("rope_theta", 10000.0), rms_norm_eps=kw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=kw["tie_word_embeddings"], initializer_range=0.02,
        rope_scaling=None if rs is None else RopeScaling(rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                                                         rs["original_max_position_embeddings"]))


@pytest.fixture(scope="module")
def tf():
    """transformers and torch, imported once for the module (transformers takes seconds to import)."""
    import torch
    import transformers
    return transformers, torch


def load_hf(tf, path):
    """transformers.LlamaForCausalLM.from_pretrained in float32 (the dtype argument was renamed in 5.0)."""
    transformers, torch = tf
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.LlamaForCausalLM.from_pretrained(str(path), **{key: torch.float32}).eval()


def hf_logits(tf, model, tokens):
    torch = tf[1]
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_models(tf, tmp_path_factory):
    """{name: (save_pretrained dir, tokens [2, SEQ], transformers' float32 logits)}."""
    transformers, torch = tf
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, kw) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=128, **kw)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.normal_(0, 0.1)
        model.save_pretrained(root / name, safe_serialization=True)
        tokens = np.random.default_rng(i).integers(0, kw["vocab_size"], (2, SEQ)).astype(np.int32)
        out[name] = (root / name, tokens, hf_logits(tf, model, tokens))
    return out


def safetensors_tensors(directory):
    """{name: float32 numpy} of every safetensors file in a directory, read by the safetensors library."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


# -- config.json ------------------------------------------------------------------------------------

def test_config_json_both_ways(hf_models):
    for name, (path, _, _) in hf_models.items():
        written_by_transformers = json.loads((path / "config.json").read_text())
        assert hf.config_from_hf(written_by_transformers) == expected_config(HF_CONFIGS[name]), name
    for cfg in [*SIZES.values(), *(expected_config(kw) for kw in HF_CONFIGS.values())]:
        out = hf.config_to_hf(cfg)
        assert out["architectures"] == ["LlamaForCausalLM"] and out["model_type"] == "llama"
        assert out["torch_dtype"] == "float32" and out["head_dim"] == cfg.head_dim
        assert hf.config_from_hf(json.loads(json.dumps(out))) == cfg


def test_config_written_is_what_transformers_builds(tf):
    transformers, _ = tf
    cfg = SIZES["llama3.2-1b"]
    theirs = transformers.LlamaConfig(**hf.config_to_hf(cfg, "bfloat16", {"bos_token_id": 128000}))
    assert (theirs.vocab_size, theirs.hidden_size, theirs.num_key_value_heads, theirs.head_dim) == (128256, 2048, 8, 64)
    assert theirs.tie_word_embeddings is True and theirs.bos_token_id == 128000
    rope = getattr(theirs, "rope_parameters", None) or dict(theirs.rope_scaling, rope_theta=theirs.rope_theta)
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0 and rope["rope_theta"] == 500000.0
    assert rope["original_max_position_embeddings"] == 8192


# -- import: trichip computes what transformers computes --------------------------------------------

@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_imported_model_matches_transformers_on_both_frameworks(hf_models, name):
    path, tokens, expected = hf_models[name]
    cfg, params = hf.read_hf_dir(path)
    assert cfg == expected_config(HF_CONFIGS[name])
    assert list(params) == list(param_shapes(cfg)) and all(v.dtype == np.float32 for v in params.values())
    assert np.abs(expected).max() > 0.5                       # logits of substance, not ~0
    for framework in ("jax", "torch"):
        got = convert.model_logits(framework, cfg, params, tokens)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= ATOL, (framework, np.abs(got - expected).max())


def test_llama3_rope_scaling_is_exercised(hf_models):
    """Without the scaling the logits move far beyond the tolerance: the match above tests it."""
    path, tokens, expected = hf_models["mqa-untied-llama3"]
    cfg, params = hf.read_hf_dir(path)
    unscaled = convert.model_logits("torch", dataclasses.replace(cfg, rope_scaling=None), params, tokens)
    assert np.abs(unscaled - expected).max() > 100 * ATOL


# -- export: transformers loads what trichip writes -------------------------------------------------

@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_to_checkpoint_to_hf_is_exact_and_loads_in_transformers(tf, hf_models, tmp_path, name):
    path, tokens, expected = hf_models[name]
    framework = ("jax", "torch")[list(HF_CONFIGS).index(name) % 2]        # either framework writes it
    assert convert.main(["from-hf", str(path), str(tmp_path / "ckpt"), "--hal", framework]) == 0
    assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    original, exported = safetensors_tensors(path), safetensors_tensors(tmp_path / "out")
    assert original.keys() == exported.keys()
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    source_config = json.loads((path / "config.json").read_text())
    exported_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert all(exported_config.get(k) == source_config.get(k) for k in hf.TOKEN_ID_KEYS)   # carried over
    model = load_hf(tf, tmp_path / "out")
    assert model.config.tie_word_embeddings == HF_CONFIGS[name]["tie_word_embeddings"]
    assert model.config.num_key_value_heads == HF_CONFIGS[name]["num_key_value_heads"]
    assert np.abs(hf_logits(tf, model, tokens) - expected).max() <= ATOL


def test_sharded_export_loads_in_transformers(tf, hf_models, tmp_path):
    path, tokens, expected = hf_models["mqa-untied-llama3"]
    cfg, params = hf.read_hf_dir(path)
    files = hf.write_hf_dir(tmp_path / "sharded", cfg, params, max_shard_bytes=100_000)
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "sharded" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params) and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
    assert set(files) == {s.name for s in shards} | {"model.safetensors.index.json", "config.json"}
    for s in shards:     # over the limit only when one tensor alone is larger than it
        header, _, _ = hf.read_safetensors_header(s)
        assert s.stat().st_size <= 100_000 + 1024 or len(header) == 1
    model = load_hf(tf, tmp_path / "sharded")
    assert np.abs(hf_logits(tf, model, tokens) - expected).max() <= ATOL
    again_cfg, again = hf.read_hf_dir(tmp_path / "sharded")
    assert again_cfg == cfg and all(np.array_equal(again[k], params[k]) for k in params)


def test_bfloat16_rounds_to_nearest_even_like_torch(tf):
    torch = tf[1]
    special = np.array([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8),
                        np.finfo(np.float32).max, -np.finfo(np.float32).max, 3.3961776e38, np.inf, -np.inf,
                        np.finfo(np.float32).tiny, 1e-45, -1e-45, 65504.0, 1 / 3], np.float32)
    rng = np.random.default_rng(0)
    values = np.concatenate([special, (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000))
                             .astype(np.float32)])
    ours = hf.bfloat16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    widened = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    assert np.array_equal(hf.float32_from_bfloat16_bits(ours), widened)
    nan = hf.float32_from_bfloat16_bits(hf.bfloat16_bits(np.array([np.nan, -np.nan], np.float32)))
    assert np.isnan(nan).all()


def test_bfloat16_only_when_asked(tf, hf_models, tmp_path):
    torch = tf[1]
    path, tokens, expected = hf_models["gqa-untied"]
    cfg, params = hf.read_hf_dir(path)
    hf.write_hf_dir(tmp_path / "f32", cfg, params)
    hf.write_hf_dir(tmp_path / "bf16", cfg, params, dtype="bfloat16")
    f32_header, _, _ = hf.read_safetensors_header(tmp_path / "f32" / "model.safetensors")
    bf16_header, _, meta = hf.read_safetensors_header(tmp_path / "bf16" / "model.safetensors")
    assert {v["dtype"] for v in f32_header.values()} == {"F32"}
    assert {v["dtype"] for v in bf16_header.values()} == {"BF16"} and meta == {"format": "pt"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.51 * (
        tmp_path / "f32" / "model.safetensors").stat().st_size

    from safetensors.torch import load_file
    on_disk = load_file(tmp_path / "bf16" / "model.safetensors")
    for k, v in params.items():                 # what torch's own float32 -> bfloat16 cast gives
        assert on_disk[k].dtype == torch.bfloat16 and torch.equal(on_disk[k], torch.from_numpy(v).to(torch.bfloat16))
    _, back = hf.read_hf_dir(tmp_path / "bf16")
    assert all(np.array_equal(back[k], on_disk[k].float().numpy()) for k in params)
    assert not all(np.array_equal(back[k], params[k]) for k in params)           # it did round

    rounded = hf_logits(tf, load_hf(tf, tmp_path / "bf16"), tokens)
    diff = np.abs(rounded - expected).max()
    assert 1e-4 < diff < 0.2, diff


# -- refusing what would convert wrongly ------------------------------------------------------------

def _copy(hf_models, tmp_path, name="gqa-untied"):
    dst = tmp_path / name
    shutil.copytree(hf_models[name][0], dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type 'gpt2'.*Llama only"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (dict(attention_bias=True), "attention_bias: true"),
    (dict(mlp_bias=True), "mlp_bias: true"),
    (dict(head_dim=32), "head_dim 32.*16"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_parameters=None, rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "RoPE scaling 'linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "RoPE scaling 'yarn'"),
    (dict(num_key_value_heads=3), "num_attention_heads.*multiple"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantized"),
])
def test_unsupported_configs_are_refused_with_the_key_to_change(hf_models, tmp_path, changes, message):
    path = _copy(hf_models, tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(UserError, match=message):
        hf.read_hf_dir(path)


def test_tensor_sets_are_checked(hf_models, tmp_path):
    import torch
    path = _copy(hf_models, tmp_path)
    _, params = hf.read_hf_dir(path)

    _edit_tensors(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    hf.read_hf_dir(path)                                               # old transformers' buffers: ignored
    _edit_tensors(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(64)}))
    with pytest.raises(UserError, match=r"does not have, e.g. \['model.layers.0.self_attn.q_proj.bias'\]"):
        hf.read_hf_dir(path)
    _edit_tensors(path, lambda t: [t.pop("model.layers.0.self_attn.q_proj.bias"), t.pop("model.norm.weight")])
    with pytest.raises(UserError, match=r"lacks 1 tensor.*model.norm.weight"):
        hf.read_hf_dir(path)
    _edit_tensors(path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(UserError, match=r"model.norm.weight has shape \[65\].*\[64\]"):
        hf.read_hf_dir(path)

    # A tied config with an lm_head.weight: accepted when it is the embedding, refused when it is not.
    tied = _copy(hf_models, tmp_path, "gqa-tied")
    _edit_tensors(tied, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    hf.read_hf_dir(tied)
    _edit_tensors(tied, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(UserError, match="tie_word_embeddings"):
        hf.read_hf_dir(tied)

    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(UserError, match="safe_serialization=True"):
        hf.read_hf_dir(path)


# -- the CLI, as a user runs it ---------------------------------------------------------------------

def _one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_from_hf_inspect_verify_score_compare(tf, hf_models, tmp_path):
    path, tokens, expected = hf_models["mha-tied-llama3"]
    ckpt_root = tmp_path / "ckpt"
    r = cli("launch.convert", "from-hf", str(path), str(ckpt_root), "--hal", "torch")
    assert r.returncode == 0, r.stderr
    # The printed training command builds exactly this model (launch.train's init_from insists on it).
    command = shlex.split(r.stdout.split("train from it: ")[1].strip())
    assert command[:4] == ["python", "-m", "launch.train", f"trainer.init_from={ckpt_root}"]
    assert LlamaConfig.from_dict(compose(command[4:])["model"]) == expected_config(HF_CONFIGS["mha-tied-llama3"])
    assert checkpoint.resolve(ckpt_root) == ckpt_root / "0" and sorted(p.name for p in ckpt_root.iterdir()) == ["0"]

    # Both backends load it: the HF parameters, step 0, zero moments.
    cfg, params = hf.read_hf_dir(path)
    for framework in ("jax", "torch"):
        backend = make_backend({"framework": framework}, cfg, OptimizerSpec())
        backend.set_state(HostState.fresh({k: np.zeros_like(v) for k, v in params.items()}))
        manifest = checkpoint.load(ckpt_root / "0", backend)
        state = backend.get_state()
        assert manifest["step"] == 0 and manifest["model"] == cfg.to_dict() and state.count == 0
        assert all(np.array_equal(state.params[k], params[k]) for k in params)
        assert all(not state.mu[k].any() and not state.nu[k].any() for k in params)

    r = cli("launch.convert", "inspect", str(ckpt_root))
    assert r.returncode == 0, r.stderr
    manifest = checkpoint.read_manifest(ckpt_root / "0")
    total = sum(int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize for t in manifest["tensors"].values())
    writer = f"writer       torch on {manifest['writer']['platform']}"
    for fragment in ("format       version 1", "step         0", writer, "rope_scaling",
                     "params/model.embed_tokens.weight", "259x96", "opt/count", "scalar",
                     f"total: {len(manifest['tensors'])} tensors, {total:,} bytes", str(path)):
        assert fragment in r.stdout, fragment

    r = cli("launch.convert", "verify", str(ckpt_root))
    assert r.returncode == 0 and r.stdout.startswith("OK: "), (r.stdout, r.stderr)

    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "one.npy", tokens[1])
    r = cli("launch.convert", "score", str(path), "--hal", "jax", "--tokens", str(tmp_path / "tokens.npy"),
            "--out", str(tmp_path / "logits.npy"))
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(tmp_path / "logits.npy") - expected).max() <= ATOL
    r = cli("launch.convert", "score", str(ckpt_root), "--hal", "torch", "--tokens", str(tmp_path / "one.npy"),
            "--out", str(tmp_path / "one-logits.npy"))
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(tmp_path / "one-logits.npy") - expected[1]).max() <= ATOL   # [T] tokens -> [T, V]

    # The same model, from an HF dir on JAX and from the checkpoint on torch: agree.
    r = cli("launch.convert", "compare", str(path), str(ckpt_root), "--hal", "jax", "--hal-b", "torch")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1].startswith("OK")

    # One weight perturbed: exit 1 with one line naming the bound that failed.
    perturbed = dict(params)
    perturbed["model.layers.1.mlp.down_proj.weight"] = params["model.layers.1.mlp.down_proj.weight"] + np.float32(0.01)
    hf.write_hf_dir(tmp_path / "perturbed", cfg, perturbed)
    r = cli("launch.convert", "compare", str(path), str(tmp_path / "perturbed"),
            "--tokens", str(tmp_path / "tokens.npy"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL: max abs logit diff") and "--atol" in last
    r = cli("launch.convert", "compare", str(path), str(tmp_path / "perturbed"), "--hal", "torch", "--atol", "100")
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL: max KL") and "--atol" not in last


def test_verify_and_to_hf_detect_a_damaged_checkpoint(hf_models, tmp_path):
    assert convert.main(["from-hf", str(hf_models["gqa-tied"][0]), str(tmp_path / "ckpt")]) == 0
    manifest_path = tmp_path / "ckpt" / "0" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    name = "params/model.layers.1.self_attn.v_proj.weight"
    manifest["tensors"][name]["digest"] = (manifest["tensors"][name]["digest"] + 1) % 2**64
    manifest_path.write_text(json.dumps(manifest))

    r = cli("launch.convert", "verify", str(tmp_path / "ckpt" / "0"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL: ") and name in lines[0] and "digest" in lines[0]

    r = cli("launch.convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    _one_line_error(r, name, "damaged")
    assert not (tmp_path / "hf").exists()


def test_cli_errors_are_one_line_and_leave_nothing(hf_models, tmp_path):
    gpt2 = _copy(hf_models, tmp_path)
    _edit_config(gpt2, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    _one_line_error(cli("launch.convert", "from-hf", str(gpt2), str(tmp_path / "out")), "'gpt2'", "Llama only")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    _one_line_error(cli("launch.convert", "inspect", str(tmp_path)), "not a trichip checkpoint")
    _one_line_error(cli("launch.convert", "score", str(tmp_path), "--tokens", "t.npy",
                        "--out", str(tmp_path / "l.npy")), "neither a trichip checkpoint")

    path = hf_models["gqa-untied"][0]
    assert convert.main(["from-hf", str(path), str(tmp_path / "ckpt")]) == 0
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    for target in (occupied, tmp_path / "ckpt"):
        _one_line_error(cli("launch.convert", "to-hf", str(tmp_path / "ckpt"), str(target)), "already exists")
        _one_line_error(cli("launch.convert", "from-hf", str(path), str(target)), "already exists")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    _one_line_error(cli("launch.convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "h"), "--dtype", "float16"),
                    "invalid choice: 'float16'")
    _one_line_error(cli("launch.convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "h"),
                        "--max-shard-size", "5XB"), "'5XB'")
    np.save(tmp_path / "bad.npy", np.array([[0, 5, 301]]))
    _one_line_error(cli("launch.convert", "score", str(path), "--tokens", str(tmp_path / "bad.npy"),
                        "--out", str(tmp_path / "l.npy")), "outside the model's vocabulary [0, 301)")
    _one_line_error(cli("launch.convert", "score", str(path), "--tokens", str(tmp_path / "bad.npy"),
                        "--out", str(occupied / "keep.txt")), "already exists")
    _one_line_error(cli("launch.convert", "compare", str(path), str(hf_models["gqa-tied"][0])), "vocabulary")
    assert not (tmp_path / "h").exists() and not (tmp_path / "l.npy").exists()


# -- a trained model goes out to transformers and comes back ---------------------------------------

def test_trained_checkpoint_exports_and_imports_unchanged(tf, tmp_path, capsys):
    run = tmp_path / "run"
    train(run, "hal=jax", "model=tiny", "trainer.steps=6", "trainer.seq_len=32", "trainer.global_batch=4",
          "trainer.eval_every=0", "trainer.log_every=6")
    assert convert.main(["to-hf", str(run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"trainer.init_from={tmp_path / 'back'} model=tiny")

    cfg = SIZES["tiny"]
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 32)).astype(np.int32)
    trained_cfg, trained, _, manifest = convert.read_checkpoint_params(run)
    back_cfg, back, _, back_manifest = convert.read_checkpoint_params(tmp_path / "back")
    assert manifest["step"] == 6 and back_manifest["step"] == 0 and trained_cfg == back_cfg == cfg
    assert all(np.array_equal(trained[k], back[k]) for k in trained)
    assert not np.array_equal(trained["model.norm.weight"], np.ones(cfg.hidden_size, np.float32))   # it trained

    backend = make_backend({"framework": "jax"}, cfg, OptimizerSpec())
    checkpoint.load(checkpoint.resolve(run), backend)
    logits_trained = backend.logits(tokens)
    checkpoint.load(checkpoint.resolve(tmp_path / "back"), backend)
    assert np.array_equal(backend.logits(tokens), logits_trained)
    assert np.abs(hf_logits(tf, load_hf(tf, tmp_path / "hf"), tokens) - logits_trained).max() <= ATOL


def test_init_from_a_hugging_face_directory(tmp_path):
    """Fine-tuning entry: trainer.init_from=HF_DIR takes the weights (fresh optimizer, step 0)."""
    import dataclasses
    from models.hf import write_hf_dir
    from models.spec import SIZES, reference_init
    from tests.conftest import cli, metrics, train
    cfg = SIZES["tiny"]
    write_hf_dir(tmp_path / "hf", cfg, reference_init(cfg, 0))
    common = ["hal=torch", "trainer.steps=4", "trainer.seq_len=32", "trainer.global_batch=4"]
    summary = train(tmp_path / "from_hf", *common, f"trainer.init_from={tmp_path / 'hf'}")
    assert summary["start_step"] == 0
    train(tmp_path / "scratch", *common)          # the same weights from the seed
    assert [m["loss"] for m in metrics(tmp_path / "from_hf")] == [m["loss"] for m in metrics(tmp_path / "scratch")]
    other = dataclasses.replace(cfg, hidden_size=64, intermediate_size=128)
    write_hf_dir(tmp_path / "hf_other", other, reference_init(other, 0))
    r = cli("launch.train", *common, f"trainer.init_from={tmp_path / 'hf_other'}", f"run_dir={tmp_path}/bad")
    assert r.returncode == 2 and "another model" in r.stderr and "hidden_size" in r.stderr
