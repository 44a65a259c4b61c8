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

from hal import mesh as meshlib
from models.errors import UserError
from models.spec import LlamaConfig, flops_per_token, logical_axes, num_params, param_shapes

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
    """The framework and how trichip runs it on this chip family."""
    return {"tpu": {"framework": "jax", "platform": "tpu", "stack": "JAX (jit over a Mesh, NamedSharding)"},
            "gpu": {"framework": "torch", "platform": "gpu", "stack": "PyTorch FSDP2"},
            "trainium": {"framework": "torch", "platform": "neuron", "stack": "TorchNeuron (FSDP2)"},
            "cpu": {"framework": spec.get("stack", "jax"), "platform": "cpu", "stack": "CPU"}}[spec["family"]]


def mesh_for(framework: str, instance_type: str | None, devices: int) -> tuple[dict, str]:
    """The mesh trichip builds: hal.mesh.choose, as both backends call it (hal.torch_backend._torch_mesh)."""
    if framework == "torch":
        from hal.torch_backend import _torch_mesh
        return _torch_mesh(None, "auto", instance_type, devices)
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


def activation_bytes_per_token_layer(cfg: LlamaConfig, seq_len: int, act_bytes: int, attention: str) -> float:
    """Bytes one layer keeps for the backward pass per token (no activation checkpointing).

    Saved in the compute dtype: the layer input, both norm outputs, q/k/v and the rotated q/k, the attention
    output, the residual between the blocks, gate, up, silu(gate) and their product; in float32: the two
    RMSNorm inputs (both frameworks normalise in float32). Attention without a fused kernel (XLA's, torch's
    math path) also keeps its scores, masked scores and probabilities: heads x seq_len float32 values each
    (`attention="materialized"`); flash kernels (cuDNN, SDPA) keep only the output and a softmax statistic.
    """
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    compute = (d + d + (q + 2 * kv) + (q + kv) + q + d + d) + 4 * f
    out = compute * act_bytes + 2 * d * 4
    if attention == "materialized":
        out += 3 * cfg.num_attention_heads * seq_len * 4
    else:
        out += cfg.num_attention_heads * 4
    return float(out)


@dataclasses.dataclass
class Memory:
    parts: dict          # name -> bytes per device
    total: float
    budget: float        # bytes the step may use per device

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def memory(cfg: LlamaConfig, mesh: dict, framework: str, micro_batch: int, seq_len: int, precision: str,
           remat: bool, attention: str, accum: int = 1, platform: str = "") -> dict:
    """Per-device bytes of one train step, by part. `micro_batch`: sequences of one forward/backward over
    the whole mesh (split over data x fsdp); `accum`: micro-batches per update.

    State (both frameworks keep float32 master weights and AdamW moments, sharded as the mesh says) and
    gradients (float32, sharded once reduced); activations for this device's share of the micro-batch;
    the logits and their float32 log-softmax; and what FSDP holds unsharded during the step: JAX's XLA
    program keeps every gathered weight (compute dtype) for the backward pass and forms the full float32
    gradients before reduce-scattering them; torch FSDP2 gathers one block at a time.
    """
    act_bytes = activation_dtype_bytes(framework, platform, precision)
    shard = shard_elements(cfg, mesh, framework)
    full = num_params(cfg)
    sharded = mesh["fsdp"] * mesh["tensor"] > 1
    rows = micro_batch / (mesh["data"] * mesh["fsdp"])
    tokens = rows * seq_len
    per_layer = activation_bytes_per_token_layer(cfg, seq_len, act_bytes, attention)
    layers = cfg.num_hidden_layers
    if remat:   # only each layer's input is kept; one layer's activations are rebuilt at a time
        acts = tokens * (layers * cfg.hidden_size * act_bytes + per_layer)
    else:
        # a tensor axis splits the head and mlp activations (about three quarters of them), not the rest
        acts = tokens * layers * per_layer * (0.25 + 0.75 / mesh["tensor"])
    # logits [tokens, vocab] in the compute dtype, their float32 copy / log-softmax, and its float32 gradient
    logit_bytes = act_bytes + 4 + 4 + (4 if framework == "torch" else 0)
    parts = {
        "params+moments": shard * 12.0,
        "gradients": shard * 4.0 * (2 if accum > 1 else 1),
        "activations": acts,
        "logits": tokens * cfg.vocab_size * logit_bytes / mesh["tensor"],
    }
    if sharded and framework == "jax":
        per_layer_params = (full - 2 * cfg.vocab_size * cfg.hidden_size) / layers
        kept = full if not remat else per_layer_params * 2
        # in float32 the gathered copy is the weight itself: XLA keeps the forward's and gathers again for
        # the backward pass (two copies); in bf16 it keeps the bf16 cast of each gathered weight
        copies = act_bytes if precision == "bf16" else 2 * act_bytes
        parts["gathered weights"] = kept * copies * (1 - 1 / (mesh["fsdp"] * mesh["tensor"]))
        parts["unreduced gradients"] = full * 4.0 * (1 - 1 / (mesh["fsdp"] * mesh["tensor"]))
    elif framework == "torch":
        block = (full - 2 * cfg.vocab_size * cfg.hidden_size) / layers
        parts["gathered weights"] = 2 * block * act_bytes + block * 4.0   # current + prefetched, one block's grads
    return parts


def activation_dtype_bytes(framework: str, platform: str, precision: str) -> int:
    """Bytes of one saved activation: the compute dtype's. (XLA:CPU keeps some bf16 elementwise results in
    float32 on one device; bench/plan_memory.py shows what that costs the prediction there.)"""
    return 2 if precision == "bf16" else 4


# -- speed and cost ---------------------------------------------------------------------------------------

def step_time(cfg: LlamaConfig, mesh: dict, spec: dict, chips: int, nodes: int, global_batch: int,
              micro_batch: int, seq_len: int, precision: str, remat: bool, mfu: float, overlap: float) -> dict:
    """Seconds per optimizer update: compute at `mfu` of the dense bf16 peak (x4/3 with activation
    checkpointing: the forward runs twice), FSDP all-gathers (forward and backward, bf16) and reduce-scatter
    (float32) per micro-batch over the chip's scale-up link, the data axis's gradient all-reduce over the
    scale-out network, and TP all-reduces over the link; `overlap` of the communication hides under compute."""
    tokens = global_batch * seq_len
    flops = tokens * flops_per_token(cfg, seq_len) * (4 / 3 if remat else 1.0)
    compute = flops / (chips * spec["bf16_tflops"] * 1e12 * mfu)
    accum = max(1, global_batch // micro_batch)
    full = num_params(cfg)
    link = spec["link_gbps"] / 2 * GB          # one direction of the quoted bidirectional figure
    act_bytes = 2 if precision == "bf16" else 4
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


def budget_bytes(spec: dict) -> float:
    hbm = spec["hbm"]["value"] * (GIB if spec["hbm"]["unit"] == "GiB" else GB)
    return hbm / spec["devices_per_chip"] * spec.get("usable_fraction", 1.0) - spec.get("reserve_gb", 0.0) * GB


def attention_kind(family: str, framework: str, precision: str) -> str:
    """Which attention trichip runs: cuDNN flash (JAX, GPU, bf16) or SDPA's fused kernels (torch on GPUs)
    keep no scores; XLA's attention on TPU/CPU/Neuron materializes them."""
    if family == "gpu" and (framework == "torch" or precision == "bf16"):
        return "flash"
    return "materialized"


def plan_target(cfg: LlamaConfig, target: Target, catalog: dict, s: Settings) -> dict:
    spec = catalog["chips"][target.chip]
    stack = stack_of(spec)
    devices = target.chips * spec["devices_per_chip"]
    mesh, source = mesh_for(stack["framework"], target.instance_type, devices)
    batch_div = mesh["data"] * mesh["fsdp"]
    budget = budget_bytes(spec)
    attention = attention_kind(spec["family"], stack["framework"], s.precision)

    def total(micro: int, remat: bool) -> tuple[float, dict]:
        parts = memory(cfg, mesh, stack["framework"], micro, s.seq_len, s.precision, remat, attention,
                       accum=max(1, s.global_batch // micro))
        return sum(parts.values()), parts

    row = {"target": target.name, "chip": target.chip, "chips": target.chips, "nodes": target.nodes,
           "devices": devices, "instance_type": target.instance_type, "framework": stack["framework"],
           "stack": stack["stack"], "mesh": mesh, "mesh_source": source, "note": target.note,
           "attention": attention, "device_budget_gb": round(budget / GB, 2)}
    problems = []
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
           "says), activations of the micro-batch, logits, FSDP's unsharded buffers, per-chip reserve",
           "prices: on-demand list prices of configs/plan/prices.yaml (region, date, source per row); no price = "
           "no cost, never an estimate",
           "FLOPs per token: models.spec.flops_per_token (6N + attention, causal not discounted)"]
    return out
