"""The model spec and both implementations: same names, same shapes, same logits."""
import dataclasses

import numpy as np
import pytest

from models.spec import SIZES, LlamaConfig, flatten, flops_per_token, nest, num_params, param_shapes, reference_init
from tests.conftest import ROOT

VARIANTS = {
    "tiny": SIZES["tiny"],
    "tied-mha": dataclasses.replace(SIZES["tiny"], tie_word_embeddings=True, num_key_value_heads=4),
    "mqa-odd-vocab": dataclasses.replace(SIZES["tiny"], vocab_size=301, num_key_value_heads=1,
                                         hidden_size=96, num_attention_heads=6, intermediate_size=200),
    "llama3-rope": dataclasses.replace(SIZES["tiny"], rope_theta=500000.0,
                                       rope_scaling=SIZES["llama3.2-1b"].rope_scaling),
}


def jax_logits(cfg, params, tokens):
    import jax
    from models.llama_jax import LlamaForCausalLM
    return np.asarray(jax.jit(LlamaForCausalLM(cfg).apply)({"params": nest(params)}, tokens))


def torch_logits(cfg, params, tokens):
    import torch
    from models.llama_torch import LlamaForCausalLM
    model = LlamaForCausalLM(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_weights_same_logits(name):
    cfg = VARIANTS[name]
    params = reference_init(cfg, seed=3)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48)).astype(np.int32)
    lj, lt = jax_logits(cfg, params, tokens), torch_logits(cfg, params, tokens)
    assert lj.shape == lt.shape == (2, 48, cfg.vocab_size)
    assert np.abs(lj).max() > 0.1          # not trivially zero
    assert np.abs(lj - lt).max() <= 1e-5


def test_flax_tree_is_the_canonical_schema():
    import jax
    from models.llama_jax import LlamaForCausalLM
    for cfg in VARIANTS.values():
        shapes = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
        got = {k: tuple(v.shape) for k, v in flatten(shapes["params"]).items()}
        assert got == param_shapes(cfg)


def test_torch_state_dict_is_the_canonical_schema():
    import torch
    from models.llama_torch import LlamaForCausalLM
    for cfg in VARIANTS.values():
        with torch.device("meta"):
            sd = LlamaForCausalLM(cfg).state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == param_shapes(cfg)


def test_published_sizes():
    assert num_params(SIZES["tiny"]) < 1_000_000
    assert 20e6 <= num_params(SIZES["small"]) <= 30e6
    assert round(num_params(SIZES["llama3.2-1b"]) / 1e9, 2) == 1.24     # 1,235,814,400
    assert round(num_params(SIZES["llama3.1-8b"]) / 1e9, 2) == 8.03     # 8,030,261,248


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = SIZES["tiny"]
    n_matmul = num_params(cfg) - cfg.vocab_size * cfg.hidden_size
    assert flops_per_token(cfg, 128) == 6 * n_matmul + 6 * cfg.num_hidden_layers * 128 * cfg.hidden_size


def test_reference_init_is_a_function_of_the_seed():
    a, b, c = (reference_init(SIZES["tiny"], s) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert all(v.dtype == np.float32 for v in a.values())


def test_model_yaml_matches_spec():
    from omegaconf import OmegaConf
    for name, cfg in SIZES.items():
        loaded = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"))
        assert loaded["name"] == name
        assert LlamaConfig.from_dict(loaded) == cfg


def test_bad_model_config_is_one_clear_error():
    with pytest.raises(ValueError, match="num_attention_heads"):
        LlamaConfig.from_dict(dict(SIZES["tiny"].to_dict(), num_key_value_heads=3))
    with pytest.raises(ValueError, match="unknown model config keys"):
        LlamaConfig.from_dict(dict(SIZES["tiny"].to_dict(), hiden_size=3))
    with pytest.raises(ValueError, match="positive integer"):
        LlamaConfig.from_dict(dict(SIZES["tiny"].to_dict(), num_hidden_layers=0))
