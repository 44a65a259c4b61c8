"""The chip planner: for a model and a list of targets, whether it fits, how trichip would shard it, how fast
it would train and what it would cost. Framework-free (the mesh comes from hal.mesh's platform rules, the
FLOPs and parameter shapes from models.spec); launch/plan.py is the command line around it.

Every figure the model rests on is data (configs/plan/chips.yaml, configs/plan/prices.yaml) or a named
assumption returned with the plan (`assumptions`), so the output says what it believed.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import yaml

from configs.schema import TrainerConfig
from hal import mesh as meshlib
from hal.base import check_fp8
from models.errors import UserError
from models.spec import LlamaConfig, flops_per_token, logical_axes, num_params, param_shapes

DEFAULT_LOSS_CHUNK = TrainerConfig.loss_chunk
DATA_DIR = Path(__file__).resolve().parents[1] / "configs" / "plan"
GB, GIB = 1e9, 2.0 ** 30

# Google's TPU accelerator types as a TPU VM or GKE node pool names them: v5p counts TensorCores
# (v5p-128 = 64 chips), v5e ("v5litepod") and v6e count chips. trichip's instance types are these names
# with a "tpu-" prefix (tpu-v5p-128); v5e is written tpu-v5e-N there.
_TPU_NAME = re.compile(r"^(?:tpu-)?(v5p|v5e|v5litepod|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Target:
    """One thing a user can rent: `chips` chips of `chip` on `nodes` nodes (a TPU slice is one target)."""
    name: str            # as the user wrote it
    chip: str            # a key of chips.yaml
    chips: int
    nodes: int
    instance_type: str | None   # what hal.instance_type says on it (the platform rule's key); None: no rule
    price_key: str | None       # a key of prices.yaml
    note: str = ""              # how the name was read (TPU naming)


def load_catalog(chips_path: str | Path | None = None, prices_path: str | Path | None = None) -> dict:
    """{chips, instances, shorthand_instance, prices}; a user's price file replaces rows by key."""
    catalog = yaml.safe_load((DATA_DIR / "chips.yaml").read_text())
    if chips_path:
        catalog = yaml.safe_load(_read(chips_path, "plan.chips"))
    prices = yaml.safe_load((DATA_DIR / "prices.yaml").read_text())["prices"]
    if prices_path:
        mine = yaml.safe_load(_read(prices_path, "plan.prices")) or {}
        if not isinstance(mine, dict) or not isinstance(mine.get("prices"), dict):
            raise UserError(f"plan.prices={prices_path}: expected a YAML mapping with a 'prices:' section "
                            f"(the layout of configs/plan/prices.yaml)")
        prices = {**prices, **mine["prices"]}
    catalog["prices"] = prices
    return catalog


def _read(path, key: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UserError(f"{key}={path}: cannot read it ({e.strerror})") from None


# -- targets ----------------------------------------------------------------------------------------------

def tpu_slice(name: str) -> tuple[str, int, int] | None:
    """(generation, chips, TensorCores) of a Google TPU accelerator type, or None if `name` is not one.
    v5p-N counts TensorCores (2 a chip, so N must be even); v5e/v5litepod-N and v6e-N count chips."""
    m = _TPU_NAME.match(name)
    if not m:
        return None
    gen, n = ("v5e" if m.group(1) == "v5litepod" else m.group(1)), int(m.group(2))
    if gen == "v5p":
        if n < 8 or n % 2:
            raise UserError(f"{name}: a v5p accelerator type counts TensorCores (2 a chip): v5p-8 (4 chips), "
                            f"v5p-16, ..., v5p-128 (64 chips)")
        return gen, n // 2, n
    return gen, n, n


def tpu_instance_type(gen: str, chips: int) -> str:
    """trichip's instance type for a slice of `chips` chips, in Google's accelerator-type numbering."""
    return f"tpu-{gen}-{chips * 2 if gen == 'v5p' else chips}"


def parse_target(text: str, catalog: dict) -> Target:
    """An instance type the mesh rules know, a TPU accelerator type, or NxCHIP (1xh100, 64xv5p, 16xtrn2)."""
    name = str(text).strip()
    chips_spec, instances = catalog["chips"], catalog["instances"]
    tpu = tpu_slice(name)
    if tpu:
        gen, chips, cores = tpu
        instance = tpu_instance_type(gen, chips)
        note = (f"{name} = {chips} {gen} chips" + (f" ({cores} TensorCores, 2 a chip)" if gen == "v5p" else "")
                + f", {chips * chips_spec[gen]['devices_per_chip']} JAX devices")
        return _checked(Target(name, gen, chips, 1, instance, f"tpu-{gen}", note))
    if name in instances:
        row = instances[name]
        return _checked(Target(name, row["chip"], row["chips"], 1, name, name))
    m = re.fullmatch(r"(\d+)x([a-z0-9]+)", name.lower())
    if m and m.group(2) in chips_spec:
        return _checked(_shorthand(name, int(m.group(1)), m.group(2), catalog))
    known = sorted(instances) + ["tpu-v5p-N", "tpu-v5e-N", "tpu-v6e-N", "NxCHIP"]
    raise UserError(f"unknown target {name!r}: use an instance type ({', '.join(known)}) or NxCHIP with CHIP one "
                    f"of {', '.join(sorted(chips_spec))} (e.g. 8xh100, 64xv5p)")


def _shorthand(name: str, n: int, chip: str, catalog: dict) -> Target:
    spec = catalog["chips"][chip]
    if n < 1:
        raise UserError(f"target {name!r}: give at least 1 chip")
    if spec["family"] == "tpu":
        gen_chips = tpu_instance_type(chip, n)
        return Target(name, chip, n, 1, gen_chips, f"tpu-{chip}", f"{name} = {gen_chips} "
                      f"({n} chips, {n * spec['devices_per_chip']} JAX devices)")
    instance = catalog["shorthand_instance"][chip]
    per_node = catalog["instances"][instance]["chips"]
    if n % per_node == 0:
        return Target(name, chip, n, n // per_node, instance, instance,
                      f"{name} = {n // per_node} x {instance}")
    if spec["family"] == "gpu" and n < per_node:
        # part of a node: no platform rule (the trainer shards FSDP over the devices) and no instance price
        return Target(name, chip, n, 1, None, None, f"{name} = {n} of the {per_node} GPUs of a {instance}")
    raise UserError(f"target {name!r}: {chip} comes {per_node} to a {instance}; give a multiple of {per_node}")


def _checked(t: Target) -> Target:
    if t.instance_type and meshlib.rule_for(t.instance_type) is None:
        raise UserError(f"target {t.name!r}: hal/mesh.py has no platform rule for {t.instance_type}")
    return t


# -- layout -----------------------------------------------------------------------------------------------

def stack_of(spec: dict) -> dict:
    """The framework and how trichip runs it on this chip family. Trainium: chips.yaml's `stack` picks JAX
    (the neuron PJRT plugin) or torch; torch with `fsdp2: false` is torch-neuronx over PyTorch/XLA, which has
    no FSDP2: every NeuronCore holds the whole state (data parallel)."""
    if spec["family"] == "trainium" and spec.get("stack") == "jax":
        return {"framework": "jax", "platform": "neuron", "stack": "JAX over the neuron PJRT plugin (jax-neuronx)"}
    if spec["family"] == "trainium" and not spec.get("fsdp2", True):
        return {"framework": "torch", "platform": "neuron", "fsdp2": False,
                "stack": "torch-neuronx over PyTorch/XLA (data parallel, no FSDP2)"}
    return {"tpu": {"framework": "jax", "platform": "tpu", "stack": "JAX (jit over a Mesh, NamedSharding)"},
            "gpu": {"framework": "torch", "platform": "gpu", "stack": "PyTorch FSDP2"},
            "trainium": {"framework": "torch", "platform": "neuron", "stack": "TorchNeuron (FSDP2)"},
            "cpu": {"framework": spec.get("stack", "jax"), "platform": "cpu", "stack": "CPU"}}[spec["family"]]


def mesh_for(framework: str, instance_type: str | None, devices: int, fsdp2: bool = True) -> tuple[dict, str]:
    """The mesh trichip builds: hal.mesh.choose, as both backends call it (hal.torch_backend._torch_mesh)."""
    if framework == "torch":
        from hal.torch_backend import _torch_mesh
        return _torch_mesh(None, "auto", instance_type, devices, fsdp2=fsdp2)
    return meshlib.choose(None, "auto", instance_type, devices)


# -- memory -----------------------------------------------------------------------------------------------

def shard_elements(cfg: LlamaConfig, mesh: dict, framework: str) -> int:
    """Parameter elements one device holds. JAX: the logical axis rules (hal.mesh.partition) as the JAX
    backend applies them; torch: the tensor axis splits what hal.torch_parallel.tensor_dims says, then FSDP2
    splits dim 0 of each rank's part over fsdp ranks (padded to equal rows)."""
    from hal.torch_parallel import tensor_dims
    total = 0
    split = tensor_dims(cfg, mesh["tensor"]) if framework == "torch" else {}
    for name, shape in param_shapes(cfg).items():
        if framework == "torch":
            part = [n // mesh["tensor"] if split[name] == i else n for i, n in enumerate(shape)]
            total += math.ceil(part[0] / mesh["fsdp"]) * math.prod(part[1:])
            continue
        parts = meshlib.partition(logical_axes(name, shape), shape, mesh)
        div = 1
        for p in parts:
            for axis in (p,) if isinstance(p, str) else (p or ()):
                div *= mesh[axis]
        total += math.prod(shape) // div
    return total


def jax_activation_bytes(cfg: LlamaConfig, seq_len: int, precision: str, attention: str, platform: str) -> float:
    """Bytes one decoder layer of the JAX step keeps for its backward pass, per token, without activation
    checkpointing: the buffers XLA's buffer assignment holds at the step's peak (bench/plan_memory.py).

    In the compute dtype: both norm outputs (2 x hidden), the rotated q and k and v (q + 2 kv), gate, up,
    silu(gate) and the sigmoid inside silu (4 x mlp). In the dtype of elementwise results (`elementwise_bytes`):
    both residual sums (2 x hidden), the attention output (q) and silu(gate) * up (mlp). XLA's attention
    (`materialized`) keeps its softmax, heads x seq_len values a token, in float32 (jax.nn takes the softmax
    in float32) and, under bf16, also their cast to bf16 that the second matmul reads; a flash kernel keeps a
    float32 log-sum-exp per head instead.
    """
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv, heads = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_attention_heads
    act = 2 if precision == "bf16" else 4
    out = act * (2 * d + q + 2 * kv + 4 * f) + elementwise_bytes(platform, precision) * (2 * d + q + f)
    if attention == "materialized":
        return float(out + heads * seq_len * (4 + (2 if precision == "bf16" else 0)))
    return float(out + heads * 4)


def jax_backward_bytes(cfg: LlamaConfig, seq_len: int, precision: str, attention: str, platform: str) -> float:
    """Bytes a token adds while one layer's backward pass runs, on top of the kept activations: the float32
    gradients of the attention probabilities and scores (2 x heads x seq_len; none with a flash kernel, which
    works block by block) and the cotangents of gate and up (2 x mlp, elementwise dtype)."""
    attn = 2 * cfg.num_attention_heads * seq_len * 4 if attention == "materialized" else 0
    return float(attn + 2 * cfg.intermediate_size * elementwise_bytes(platform, precision))


def torch_activation_bytes(cfg: LlamaConfig, seq_len: int, act_bytes: int, attention: str,
                           autocast: bool = False) -> float:
    """Bytes one decoder layer of the torch model keeps for autograd per token (no activation checkpointing).

    Saved in the compute dtype: the layer input, both norm outputs, q/k/v and the rotated q/k, the attention
    output, the residual between the blocks, gate, up, silu(gate) and their product; in float32: the two
    RMSNorm inputs (models/llama_torch.py normalises in float32). The math attention path also keeps its
    scores, masked scores and probabilities: heads x seq_len float32 values each (`attention="materialized"`);
    SDPA's fused kernels keep only the output and a softmax statistic.

    `autocast` (bf16 without FSDP2: float32 weights cast by autocast): the residual stream is float32 (the
    embedding's output is), so each RMSNorm's input is the float32 residual itself, its output stays float32
    beside the normalized values, and the projections save that output's bf16 cast: 6 x hidden bytes a
    norm beyond the count above.
    """
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    compute = (d + d + (q + 2 * kv) + (q + kv) + q + d + d) + 4 * f
    out = compute * act_bytes + 2 * d * 4 + (2 * 6 * d if autocast and act_bytes == 2 else 0)
    if attention == "materialized":
        out += 3 * cfg.num_attention_heads * seq_len * 4
    else:
        out += cfg.num_attention_heads * 4
    return float(out)


def memory(cfg: LlamaConfig, mesh: dict, framework: str, micro_batch: int, seq_len: int, precision: str,
           remat: bool, attention: str, accum: int = 1, platform: str = "",
           loss_chunk: int = DEFAULT_LOSS_CHUNK) -> dict:
    """Per-device bytes of one train step, by part. `micro_batch`: sequences of one forward/backward over
    the whole mesh (split over data x fsdp); `accum`: micro-batches per update; `platform`: "cpu" where the
    step runs on XLA:CPU (bf16 elementwise results in float32), anything else for an accelerator;
    `loss_chunk`: trainer.loss_chunk (0: the loss through the whole logits).

    Both frameworks keep float32 master weights and AdamW moments and float32 gradients, sharded as the
    mesh says (JAX: the gradients take the parameters' sharding from the step's out_shardings, one layer's
    reduced at a time; torch: FSDP2 reduce-scatters each block's); activations for this device's share of
    the micro-batch; the loss's buffers (`logit_bytes`); and the weights held beyond the shards
    (`_jax_weights`, `_torch_weights`). The parts are those live at the step's peak.

    fp8 is sized as bf16. torchao's Float8Linear saves its bf16 input for the backward pass and casts it to
    float8 again there, as bf16 saves it; the JAX path saves float8 copies of each projection's input
    instead, which changes a layer's activations by a few percent (the norm outputs once per projection:
    + hidden bytes a token; down_proj's input: - mlp bytes). For the weights bf16 sizing is an upper bound:
    without FSDP, Float8Linear saves the float32 parameter itself (no bf16 copy) and JAX a float8 copy
    (1 byte a weight, not 2).
    """
    precision = sizing_precision(precision)
    act_bytes = 2 if precision == "bf16" else 4
    shard = shard_elements(cfg, mesh, framework)
    tokens = micro_batch / (mesh["data"] * mesh["fsdp"]) * seq_len
    layers = cfg.num_hidden_layers
    if framework == "jax":
        per_layer = jax_activation_bytes(cfg, seq_len, precision, attention, platform)
        working = tokens * jax_backward_bytes(cfg, seq_len, precision, attention, platform)
    else:
        per_layer = torch_activation_bytes(cfg, seq_len, act_bytes, attention,
                                           autocast=mesh["data"] * mesh["fsdp"] == 1)
        working = 0.0
    if remat:
        # Each layer's input is kept (a residual sum); one layer's activations are rebuilt at a time. This
        # assumes XLA schedules each layer's recomputation just before its backward pass, as jax.checkpoint's
        # optimization barriers ask (XLA's GPU compiler expands them only after scheduling; assumed on TPU).
        # XLA:CPU expands them before fusion and CSE, so on the CPU the recomputation merges into the forward
        # pass and saves little (bench/RESULTS.md).
        acts = tokens * (layers * cfg.hidden_size * elementwise_bytes(platform, precision) + per_layer)
    else:
        # a tensor axis splits the head and mlp activations (about three quarters of them), not the rest
        acts = tokens * layers * per_layer * (0.25 + 0.75 / mesh["tensor"])
    backward = {
        "activations": acts,
        "backward working set": working / mesh["tensor"],
        "logits": logit_bytes(cfg, mesh, framework, micro_batch, seq_len, precision, platform, loss_chunk),
        **(_jax_weights(cfg, mesh, remat, precision, platform) if framework == "jax"
           else _torch_weights(cfg, mesh, precision)),
    }
    state = {"params+moments": shard * 12.0}
    if accum > 1:   # the float32 accumulator of the micro-batches' gradients lives through every backward pass
        state["gradient accumulator"] = shard * 4.0
    # The backward pass frees a layer's activations as it forms that layer's gradients, so the step peaks
    # where it starts (the activations and one layer's gradients) or where it ends (every gradient).
    gradients = shard * 4.0
    layer_gradients = gradients * _block_params(cfg) / num_params(cfg)
    if gradients >= sum(backward.values()) + layer_gradients:
        return {**state, "gradients": gradients}
    return {**state, "gradients (one layer)": layer_gradients, **backward}


def sizing_precision(precision: str) -> str:
    """The precision a step's buffers are sized as: fp8 keeps its activations and weight copies in bf16
    (memory's docstring says what float8 adds or saves)."""
    return "bf16" if precision == "fp8" else precision


def chunk_tokens(rows: int, seq_len: int, loss_chunk: int) -> int:
    """Tokens of one chunk of the chunked loss on a device holding `rows` rows: both frameworks take
    max(1, loss_chunk // rows) positions of every row at a time, at most the whole row (JAX pads the last
    chunk to that size, torch's last chunk is shorter)."""
    positions = max(1, loss_chunk // max(1, rows))
    return rows * min(positions, seq_len)


def logit_bytes(cfg: LlamaConfig, mesh: dict, framework: str, micro_batch: int, seq_len: int, precision: str,
                platform: str, loss_chunk: int) -> float:
    """Bytes of the loss at the step's peak. Whole logits (loss_chunk 0; a chunk of all the device's tokens,
    which both frameworks take whole; or a tensor axis, where both take the vocabulary-split logits whole):
    [tokens, vocab] in the compute dtype, their float32 copy / log-softmax and its float32 gradient (torch:
    and the float32 logits it returns, which under fp32 are the logits themselves).

    Chunked (`chunk_tokens` a chunk): JAX (models.llama_jax.chunked_cross_entropy, a scan of checkpointed
    chunks) holds one chunk's logits in the compute dtype, their float32 copy and its float32 gradient while
    the backward pass recomputes that chunk, beside the float32 gradient of the output weight the scan
    accumulates and the hidden states' gradient in the compute dtype. torch
    (models.llama_torch._ChunkedCrossEntropy) forms the gradients in the forward pass: one chunk's float32
    logits (turned into their gradient in place) and its cast to the compute dtype, beside grad_h [tokens,
    hidden] in the compute dtype and grad_w [vocab, hidden] in float32; the backward pass then scales both
    into new tensors."""
    rows = max(1, round(micro_batch / (mesh["data"] * mesh["fsdp"])))
    tokens, vocab, hidden = rows * seq_len, cfg.vocab_size, cfg.hidden_size
    act = 2 if precision == "bf16" else 4
    cast = act if act != 4 else 0         # a cast to or from the compute dtype (none under fp32)
    if not loss_chunk or mesh["tensor"] > 1 or chunk_tokens(rows, seq_len, loss_chunk) >= tokens:
        per_logit = act + 4 + 4 + (4 if framework == "torch" and cast else 0)
        return tokens * vocab * per_logit / mesh["tensor"]
    chunk = chunk_tokens(rows, seq_len, loss_chunk)
    if framework == "jax":
        return chunk * vocab * (cast + 4 + 4) + vocab * hidden * 4 + tokens * hidden * act
    forward = chunk * vocab * (4 + cast) + vocab * hidden * cast
    backward = tokens * hidden * act + vocab * hidden * (4 + cast)
    return tokens * hidden * act + vocab * hidden * 4 + max(forward, backward)


def _block_params(cfg: LlamaConfig) -> float:
    """Parameters of one decoder layer."""
    return (num_params(cfg) - (1 if cfg.tie_word_embeddings else 2) * cfg.vocab_size * cfg.hidden_size
            - cfg.hidden_size) / cfg.num_hidden_layers


def _jax_weights(cfg: LlamaConfig, mesh: dict, remat: bool, precision: str, platform: str) -> dict:
    """Weights XLA's step holds beyond the shards. Sharded: every weight the forward pass gathered stays live
    for the backward pass (no second gather), in float32 (the program gathers the float32 parameter and
    casts it after); with activation checkpointing the recomputation gathers again, so about two layers'
    weights are held. Each weight gradient is formed as a float32 partial sum over this device's rows and
    then reduce-scattered: one layer's, at a time. Unsharded under bf16: the bf16 cast of every weight,
    kept from the forward pass for the backward matmuls (XLA:CPU keeps the bf16-rounded values in float32)."""
    shards = mesh["fsdp"] * mesh["tensor"]
    if shards == 1:
        return {"bf16 weight copies": num_params(cfg) * float(elementwise_bytes(platform, precision))} \
            if precision == "bf16" else {}
    kept = 2 * _block_params(cfg) if remat else num_params(cfg)
    return {"gathered weights": kept * 4.0 * (1 - 1 / shards),
            "unreduced gradients": _block_params(cfg) * 4.0 * (1 - 1 / shards)}


def _torch_weights(cfg: LlamaConfig, mesh: dict, precision: str) -> dict:
    """Weights torch holds beyond its shards. FSDP2 gathers one block at a time and prefetches the next (two
    blocks in the compute dtype) and reduce-scatters each block's float32 gradients as the backward pass
    leaves it. Without FSDP2, bf16 runs under autocast, whose bf16 casts of the weights the matmuls save for
    the backward pass: every weight, once, in bf16."""
    if mesh["data"] * mesh["fsdp"] > 1:
        block = _block_params(cfg)
        act_bytes = 2 if precision == "bf16" else 4
        return {"gathered weights": (2 * block * act_bytes + block * 4.0) / mesh["tensor"]}
    if precision == "bf16":
        return {"bf16 weight copies": num_params(cfg) * 2.0 / mesh["tensor"]}
    return {}


def elementwise_bytes(platform: str, precision: str) -> int:
    """Bytes of an elementwise result: the compute dtype's, except on XLA:CPU under bf16, which has no bf16
    arithmetic: it computes bf16 elementwise operations in float32 and keeps their results in float32."""
    if sizing_precision(precision) != "bf16":
        return 4
    return 4 if platform == "cpu" else 2


# -- speed and cost ---------------------------------------------------------------------------------------

def step_time(cfg: LlamaConfig, mesh: dict, spec: dict, chips: int, nodes: int, global_batch: int,
              micro_batch: int, seq_len: int, precision: str, remat: bool, mfu: float, overlap: float) -> dict:
    """Seconds per optimizer update: compute at `mfu` of the dense bf16 peak (x4/3 with activation
    checkpointing: the forward runs twice), at every precision: fp8's MFU is counted against the bf16 peak
    too, as trainer/observe.py logs it, so a measured fp8 MFU carries its speed-up and the assumed (bf16)
    one none; FSDP all-gathers (forward and backward, bf16) and reduce-scatter
    (float32) per micro-batch over the chip's scale-up link, the data axis's gradient all-reduce over the
    scale-out network, and TP all-reduces over the link; `overlap` of the communication hides under compute."""
    tokens = global_batch * seq_len
    flops = tokens * flops_per_token(cfg, seq_len) * (4 / 3 if remat else 1.0)
    compute = flops / (chips * spec["bf16_tflops"] * 1e12 * mfu)
    accum = max(1, global_batch // micro_batch)
    full = num_params(cfg)
    link = spec["link_gbps"] / 2 * GB          # one direction of the quoted bidirectional figure
    act_bytes = 2 if sizing_precision(precision) == "bf16" else 4   # fp8: FSDP2 gathers the bf16 weights
    fsdp, data, tensor = mesh["fsdp"], mesh["data"], mesh["tensor"]
    comm = 0.0
    if fsdp > 1:
        ring = (fsdp - 1) / fsdp
        per_micro = (2 * full * act_bytes + full * 4) / tensor * ring
        comm += accum * per_micro / (link if nodes == 1 or fsdp <= chips // nodes else spec["scaleout_gbps"] * GB)
    if data > 1:
        comm += 2 * (full * 4 / (fsdp * tensor)) * (data - 1) / data / (spec["scaleout_gbps"] * GB)
    if tensor > 1:   # inside a chip (Trainium's NeuronCores share HBM): over HBM bandwidth
        rows = micro_batch / (data * fsdp)
        tp_bytes = 4 * cfg.num_hidden_layers * rows * seq_len * cfg.hidden_size * act_bytes
        comm += accum * tp_bytes * 2 * (tensor - 1) / tensor / (spec["hbm_bw_gbps"] * GB)
    step = max(compute, overlap * comm) + (1 - overlap) * comm
    return {"step_s": step, "compute_s": compute, "comm_s": comm, "flops_per_token": flops_per_token(cfg, seq_len)}


def hourly_price(target: Target, catalog: dict) -> dict | None:
    """{usd_per_hour, region, date, source, note} for the whole target, or None where no price is known."""
    row = catalog["prices"].get(target.price_key) if target.price_key else None
    if not row:
        return None
    if row.get("usd_per_chip_hour") is not None:
        usd = float(row["usd_per_chip_hour"]) * target.chips
    elif row.get("usd_per_hour") is not None:
        usd = float(row["usd_per_hour"]) * target.nodes
    else:
        return None
    return {"usd_per_hour": usd, **{k: row.get(k) for k in ("region", "date", "source", "note")}}


# -- one target -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    seq_len: int
    global_batch: int
    micro_batch: int | None
    precision: str
    remat: bool | str           # true | false | "auto" (checkpoint only where it does not fit without)
    overlap: float
    mfu: dict                   # chip -> MFU overriding chips.yaml (a measurement)
    loss_chunk: int = DEFAULT_LOSS_CHUNK    # trainer.loss_chunk: tokens per chunk of the loss, 0 = whole logits


def budget_bytes(spec: dict) -> float:
    hbm = spec["hbm"]["value"] * (GIB if spec["hbm"]["unit"] == "GiB" else GB)
    return hbm / spec["devices_per_chip"] * spec.get("usable_fraction", 1.0) - spec.get("reserve_gb", 0.0) * GB


def attention_kind(family: str, framework: str, precision: str) -> str:
    """Which attention trichip runs: cuDNN flash (JAX, GPU, bf16 or fp8, whose attention is bf16) or SDPA's
    fused kernels (torch on GPUs) keep no scores; XLA's attention on TPU/CPU/Neuron materializes them."""
    if family == "gpu" and (framework == "torch" or sizing_precision(precision) == "bf16"):
        return "flash"
    return "materialized"


def plan_target(cfg: LlamaConfig, target: Target, catalog: dict, s: Settings) -> dict:
    spec = catalog["chips"][target.chip]
    stack = stack_of(spec)
    devices = target.chips * spec["devices_per_chip"]
    mesh, source = mesh_for(stack["framework"], target.instance_type, devices, stack.get("fsdp2", True))
    batch_div = mesh["data"] * mesh["fsdp"]
    budget = budget_bytes(spec)
    attention = attention_kind(spec["family"], stack["framework"], s.precision)

    def total(micro: int, remat: bool) -> tuple[float, dict]:
        parts = memory(cfg, mesh, stack["framework"], micro, s.seq_len, s.precision, remat, attention,
                       accum=max(1, s.global_batch // micro), loss_chunk=s.loss_chunk)
        return sum(parts.values()), parts

    row = {"target": target.name, "chip": target.chip, "chips": target.chips, "nodes": target.nodes,
           "devices": devices, "instance_type": target.instance_type, "framework": stack["framework"],
           "stack": stack["stack"], "mesh": mesh, "mesh_source": source, "note": target.note,
           "attention": attention, "device_budget_gb": round(budget / GB, 2)}
    problems = fp8_problems(spec, s.precision)
    if s.global_batch % batch_div:
        problems.append(f"global batch {s.global_batch} is not a multiple of data x fsdp = {batch_div}")
    remat, micro = choose_remat_and_micro(total, budget, batch_div, s)
    mem, parts = total(micro, remat)
    row.update(remat=remat, micro_batch=micro, per_device_gb=round(mem / GB, 3),
               memory_gb={k: round(v / GB, 3) for k, v in parts.items()},
               per_device_gb_no_remat=round(total(micro, False)[0] / GB, 3),
               per_device_gb_remat=round(total(micro, True)[0] / GB, 3),
               largest_micro_batch=_largest_micro(lambda m: total(m, remat)[0], budget, batch_div, s.global_batch))
    fits = mem <= budget and not problems
    row["fits"] = fits
    row["problems"] = problems + ([] if mem <= budget else
                                  [f"needs {mem / GB:.1f} GB a device, has {budget / GB:.1f} GB"])
    mfu = s.mfu.get(target.chip, spec["mfu"])
    speed = step_time(cfg, mesh, spec, target.chips, target.nodes, s.global_batch, micro, s.seq_len,
                      s.precision, remat, mfu, s.overlap)
    price = hourly_price(target, catalog)
    tokens_per_s = s.global_batch * s.seq_len / speed["step_s"]
    row.update(mfu=mfu, mfu_source="measured" if target.chip in s.mfu else "assumed", step_s=speed["step_s"],
               compute_s=speed["compute_s"], comm_s=speed["comm_s"], flops_per_token=speed["flops_per_token"],
               price=price, usd_per_hour=price["usd_per_hour"] if price else None)
    row["tokens_per_s"] = tokens_per_s if fits else None
    row["usd_per_1m_tokens"] = (price["usd_per_hour"] / 3600 / tokens_per_s * 1e6) if (fits and price) else None
    return row


def fp8_problems(spec: dict, precision: str) -> list[str]:
    """[] unless plan.precision=fp8 on a chip the trainer refuses it on (hal.base.check_fp8: float8 tensor
    cores, CUDA compute capability 8.9+, chips.yaml's `cuda_capability`); then the one line it refuses with."""
    if precision != "fp8":
        return []
    capability = spec.get("cuda_capability")
    try:
        check_fp8(spec.get("name", "this chip"), tuple(capability) if capability else None)
    except UserError as e:
        return [str(e)]
    return []


def choose_remat_and_micro(total, budget: float, div: int, s: Settings) -> tuple[bool, int]:
    """(activation checkpointing, micro-batch): plan.micro_batch when given, else the largest that fits;
    checkpointing off when that fits (plan.remat=auto), else on. When nothing fits: the smallest micro-batch
    with checkpointing, so the row says by how much."""
    choices = [False, True] if s.remat == "auto" else [bool(s.remat)]
    for remat in choices:
        if s.micro_batch:
            if total(s.micro_batch, remat)[0] <= budget:
                return remat, s.micro_batch
            continue
        largest = _largest_micro(lambda m: total(m, remat)[0], budget, div, s.global_batch)
        if largest:
            return remat, largest
    return choices[-1], s.micro_batch or _fitting_micro(s.global_batch, div) or s.global_batch


def _fitting_micro(global_batch: int, div: int) -> int | None:
    """The smallest micro-batch that divides the global batch and is a multiple of data x fsdp."""
    for m in range(1, global_batch + 1):
        if global_batch % m == 0 and m % div == 0:
            return m
    return None


def _largest_micro(total, budget: float, div: int, global_batch: int) -> int | None:
    """The largest micro-batch (a multiple of data x fsdp dividing the global batch) that fits, or None."""
    best = None
    for m in range(div, global_batch + 1, div):
        if global_batch % m == 0 and total(m) <= budget:
            best = m
    return best


# -- the plan ---------------------------------------------------------------------------------------------

def finish(rows: list[dict], tokens: float | None, tokens_per_s: float | None, hours: float | None) -> list[dict]:
    """Time and cost of the budget per row, whether it meets the requirement, and the ranking: fitting rows
    that meet it, cheapest first; then the other fitting rows; then those without a price; then misfits."""
    need = tokens_per_s
    if tokens and hours:
        need = max(need or 0.0, tokens / (hours * 3600))
    for r in rows:
        tps = r["tokens_per_s"]
        r["hours"] = tokens / tps / 3600 if (tokens and tps) else None
        r["usd_total"] = r["hours"] * r["usd_per_hour"] if (r["hours"] and r["usd_per_hour"]) else None
        r["meets_requirement"] = bool(tps and (need is None or tps >= need))
    ranked = sorted(rows, key=lambda r: (not r["fits"], not r["meets_requirement"], r["usd_per_1m_tokens"] is None,
                                          r["usd_per_1m_tokens"] or 0.0, -(r["tokens_per_s"] or 0.0)))
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


def smallest_holding(cfg: LlamaConfig, catalog: dict, s: Settings) -> dict | None:
    """When nothing fits: the smallest slice of each family that would hold the model (powers of two of
    chips, up to 4,096), the smallest of them first."""
    found = []
    for chip, spec in catalog["chips"].items():
        if spec["family"] == "cpu":
            continue
        for k in range(0, 13):
            n = 2 ** k
            try:
                t = parse_target(f"{n}x{chip}", catalog)
            except UserError:
                continue
            batch = max(s.global_batch, n * spec["devices_per_chip"])
            row = plan_target(cfg, t, catalog, dataclasses.replace(s, global_batch=batch, micro_batch=None,
                                                                    remat=True))
            if row["fits"]:
                found.append((n * spec["bf16_tflops"], row["target"], row["per_device_gb"]))
                break
    if not found:
        return None
    _, name, gb = min(found)
    return {"target": name, "per_device_gb": gb}


def assumptions(catalog: dict, s: Settings, chips_used: set) -> list[str]:
    mfus = []
    for c in sorted(chips_used):
        value = s.mfu.get(c, catalog["chips"][c]["mfu"])
        mfus.append(f"{c} {value:.0%}" + (" (measured here)" if c in s.mfu else " (assumed)"))
    out = [f"dense bf16 peaks (no sparsity); MFU {', '.join(mfus)}",
           f"communication overlap with compute: {s.overlap:.0%}; link bandwidth = half the quoted bidirectional "
           f"per-chip figure; FSDP all-gathers in bf16 twice a micro-batch, reduce-scatter in float32",
           "memory: float32 master weights + AdamW moments + float32 gradients (16 B/param, sharded as the mesh "
           "says), activations of the micro-batch, logits, FSDP's unsharded buffers (JAX: every gathered weight "
           "in float32 until the backward pass; torch FSDP2: two blocks), per-chip reserve",
           "activation checkpointing keeps each layer's input and rebuilds one layer at a time (JAX: assuming "
           "XLA keeps jax.checkpoint's optimization barriers through scheduling; XLA:CPU expands them early and "
           "saves little, bench/RESULTS.md)",
           "prices: on-demand list prices of configs/plan/prices.yaml (region, date, source per row); no price = "
           "no cost, never an estimate",
           "FLOPs per token: models.spec.flops_per_token (6N + attention, causal not discounted)",
           (f"loss: chunks of {s.loss_chunk} tokens a device (trainer.loss_chunk; the whole logits under a "
            f"tensor axis)" if s.loss_chunk else "loss: through the whole logits (trainer.loss_chunk=0)")]
    if s.precision == "fp8":
        out.append("fp8: memory sized as bf16 (float8 copies replace bf16 ones; launch/planner.py memory); "
                   "MFU against the bf16 peak, so the assumed MFU gives bf16's speed: measure fp8 (--measure "
                   "or plan.mfu) for its speed-up; chips without float8 tensor cores are refused")
    return out
