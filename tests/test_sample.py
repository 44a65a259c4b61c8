"""Text from a checkpoint: decoding with a KV cache on JAX and torch (models.*.generate through hal.generate and
`python -m launch.sample`), checked against each framework's full forward and against transformers' own
`generate` on the `to-hf` export of the same checkpoint. Models are small Llamas built by transformers from
random configs: GQA and MQA, tied and untied embeddings, vocabularies that are not powers of two, hidden
sizes that are odd multiples of the head size, Llama 3 RoPE scaling."""
import json
import logging

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, UserError, make_backend
from hal import generate as gen
from launch import convert, sample
from models import llama_jax, llama_torch
from models.spec import LlamaConfig, RopeScaling, nest
from tests.conftest import train

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CONFIGS = {
    "gqa-untied-llama3": dict(vocab_size=301, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                              rope_theta=500000.0, rope_scaling=LLAMA3),
    "mqa-tied": dict(vocab_size=259, hidden_size=80, intermediate_size=144, num_hidden_layers=3,
                     num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=True),
}
NEW = 24


def _llama_config(kw: dict) -> LlamaConfig:
    rs = kw.get("rope_scaling")
    return LlamaConfig(**{k: v for k, v in kw.items() if k != "rope_scaling"}, max_position_embeddings=128,
                       rope_scaling=rs and RopeScaling(rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                                                       rs["original_max_position_embeddings"]))


def _random_params(cfg: LlamaConfig, seed: int) -> dict:
    """Weights with logit gaps wide enough that greedy choices do not hinge on rounding."""
    from models.spec import param_shapes
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(0, 0.25, s) + (1.0 if k.endswith("norm.weight") else 0.0)).astype(np.float32)
            for k, s in param_shapes(cfg).items()}


@pytest.fixture(scope="module")
def tf():
    import torch
    import transformers
    return transformers, torch


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_cached_decoding_equals_the_full_forward(framework):
    """Prefill of a prompt and then one cached position at a time give the logits the training forward
    gives for the whole sequence."""
    cfg = _llama_config(CONFIGS["gqa-untied-llama3"])
    params = _random_params(cfg, 0)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    backend = make_backend({"framework": framework}, cfg, OptimizerSpec())
    backend.set_state(HostState.fresh(params))
    full = backend.logits(tokens)
    if framework == "jax":
        cache = llama_jax.init_cache(cfg, 2, 12)
        head, cache = llama_jax.forward_cached(nest(params), cfg, tokens[:, :9], cache, 0)
        steps = []
        for i in range(9, 12):
            out, cache = llama_jax.forward_cached(nest(params), cfg, tokens[:, i:i + 1], cache, i)
            steps.append(np.asarray(out))
        cached = np.concatenate([np.asarray(head)] + steps, axis=1)
    else:
        import torch
        net = gen._torch_model(cfg, params, torch.device("cpu"))
        t = torch.from_numpy(tokens.astype(np.int64))
        cache = llama_torch.init_cache(cfg, 2, 12, "cpu")
        parts = [llama_torch.forward_cached(net, t[:, :9], cache, 0)]
        parts += [llama_torch.forward_cached(net, t[:, i:i + 1], cache, i) for i in range(9, 12)]
        cached = torch.cat(parts, dim=1).numpy()
    np.testing.assert_allclose(cached, full, atol=5e-5, rtol=5e-5)      # float32 sums in another order


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_equal_on_jax_torch_and_transformers_generate(tf, tmp_path, capsys, name):
    """A transformers model -> from-hf checkpoint -> launch.sample on both frameworks, and the checkpoint's
    to-hf export -> transformers' generate: the same greedy tokens, token for token."""
    transformers, torch = tf
    kw = CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, max_position_embeddings=128))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
            if p.ndim == 1:
                p.add_(1.0)
    model.save_pretrained(tmp_path / "hf")
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpts")]) == 0
    ckpt = str(tmp_path / "ckpts" / "0")
    prompt = [5, 17, 250, 3, 99, 42, 7]
    tokens = {}
    for framework in ("jax", "torch"):
        capsys.readouterr()
        assert sample.main([ckpt, "--hal", framework, "--prompt-ids", ",".join(map(str, prompt)),
                            "--max-new-tokens", str(NEW), "--json", "--tokenizer", "bytes"]) == 0
        line = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert line["prompt_ids"] == prompt and len(line["ids"]) == NEW
        tokens[framework] = line["ids"]
    assert convert.main(["to-hf", ckpt, str(tmp_path / "export"), "--tokenizer", "bytes"]) == 0
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "export"), **{key: torch.float32}).eval()
    exported.generation_config.eos_token_id = None          # every one of the NEW tokens, as launch.sample makes
    with torch.no_grad():
        out = exported.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    assert tokens["jax"] == tokens["torch"] == theirs, tokens
    assert len(set(theirs)) > 3          # not one token repeated: the comparison has something to compare


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_seeded_sampling_is_reproducible_per_framework(framework):
    cfg = _llama_config(CONFIGS["mqa-tied"])
    params = _random_params(cfg, 2)
    prompt = np.array([[1, 2, 3], [1, 2, 3]], np.int32)
    draw = [gen.generate(framework, cfg, params, prompt, 16, temperature=1.5, top_k=0, seed=s) for s in (7, 7, 8)]
    assert np.array_equal(draw[0], draw[1])
    assert not np.array_equal(draw[0], draw[2])
    assert not np.array_equal(draw[0][0], draw[0][1])       # the rows of one batch are separate draws
    top2 = gen.generate(framework, cfg, params, prompt[:1], 16, temperature=1.5, top_k=2, seed=7)
    greedy = gen.generate(framework, cfg, params, prompt[:1], 16)
    assert top2.shape == greedy.shape == (1, 16) and not np.array_equal(top2, draw[0][:1])


def test_requests_the_model_cannot_serve_are_one_line():
    cfg = _llama_config(CONFIGS["mqa-tied"])
    params = _random_params(cfg, 0)
    for prompt, new, fragment in (([[1] * 100], 40, "max_position_embeddings"), ([[400]], 4, "vocabulary"),
                                  ([[1]], 0, "at least 1")):
        with pytest.raises(UserError, match=fragment):
            gen.generate("jax", cfg, params, np.array(prompt), new)


@pytest.mark.slow
def test_sample_a_trained_run_with_its_tokenizer_and_during_training(tmp_path, capsys, caplog):
    """A run trained on a BPE tokenizer: trainer.sample_every logs samples; launch.sample on the run dir
    decodes with the run's tokenizer.json, the same text on both frameworks and as the run's last sample
    (greedy)."""
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="trichip")
    train(run, "hal=jax", "data.tokenizer=train-bpe:320", "data.vocab=tokenizer", "trainer.steps=4",
          "trainer.seq_len=32", "trainer.global_batch=4", "trainer.eval_every=0", "trainer.sample_every=2",
          "trainer.sample_tokens=6", "trainer.sample_prompt=import", "trainer.tensorboard=false")
    texts = {}
    for framework in ("jax", "torch"):
        capsys.readouterr()
        assert sample.main([str(run), "--hal", framework, "--prompt", "import", "--max-new-tokens", "6", "--json"]) == 0
        texts[framework] = json.loads(capsys.readouterr().out.splitlines()[-1])
    from trainer import tokenizer as tk
    tok = tk.HFTokenizer(run / "tokenizer.json")
    line = texts["jax"]
    assert line["prompt_ids"] == tok.encode_batch(["import"])[0].tolist() and line["text"].startswith("import")
    assert line["text"] == tok.decode(line["prompt_ids"] + line["ids"]) and texts["torch"] == line
    assert "sample at step 2: 'import" in caplog.text
    assert f"sample at step 4: {line['text']!r}" in caplog.text
    assert sample.main([str(run), "--prompt", "x", "--tokenizer", "bytes"]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
