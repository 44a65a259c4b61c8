"""The run configuration's schema: Hydra structured configs (dataclasses in Hydra's ConfigStore).

train.yaml starts its defaults list with `schema`, so every group option (hal/, model/, data/, optim/) and every
command-line override is merged into these typed nodes: an unknown key, a value of the wrong type or a name
that is not a member of its enum fails at composition with Hydra's own message. The defaults of every key live
here, once; what is left to check in code (trainer.loop.Run) is ranges and how keys relate to each other.

`compose(overrides)` builds the config exactly as `python -m launch.train OVERRIDES` does.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from models.errors import UserError, first_line


def _choices(name: str, *values: str) -> type[enum.Enum]:
    """An enum whose member names are the values a user types (OmegaConf matches by name); its members are
    also strings, so a composed DictConfig compares equal to the plain value (cfg.hal.framework == "jax")."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Framework = _choices("Framework", "jax", "torch")
Platform = _choices("Platform", "auto", "cpu", "gpu", "tpu", "neuron")
Attention = _choices("Attention", "auto", "xla", "cudnn")
Precision = _choices("Precision", "fp32", "bf16", "fp8")
Schedule = _choices("Schedule", "cosine", "linear", "constant")
OnNonFinite = _choices("OnNonFinite", "stop", "skip")
OnSaveError = _choices("OnSaveError", "stop", "continue")
VocabPolicy = _choices("VocabPolicy", "check", "tokenizer", "pad128")
LoggerName = _choices("LoggerName", "tensorboard", "wandb", "mlflow")


@dataclass
class NeuronConfig:
    cache_dir: Optional[str] = None         # compile cache; default $NEURON_COMPILE_CACHE_URL or ~/.cache/neuron
    stochastic_rounding: bool = True        # only where the weights themselves are bf16


@dataclass
class HalConfig:
    framework: Framework = MISSING          # hal=jax | hal=torch | hal=trainium picks it
    platform: Platform = Platform.auto
    # Mesh axes (data, fsdp, tensor); -1 = the rest of the devices. null: the platform rule for
    # instance_type (hal/mesh.py MESH_RULES), else data parallel over every device. Typed Any, not
    # Optional[Dict[str, int]]: OmegaConf cannot merge a dict override into a None-valued typed dict
    # (hal/mesh.py checks the axes and sizes).
    mesh: Any = None
    mesh_rule: str = "auto"                 # auto | none | an instance type whose rule to use
    instance_type: Optional[str] = None     # default: $TRICHIP_INSTANCE_TYPE
    distributed: Any = "auto"               # JAX: jax.distributed.initialize(): auto | true | false
    attention: Attention = Attention.auto   # JAX: auto (cuDNN flash attention on GPUs in bf16) | xla | cudnn
    # persistent compile caches (JAX's XLA cache; torch inductor's FX graph and AOTAutograd caches) in <dir>/jax
    # and <dir>/inductor; null = per user under $TRICHIP_CACHE (hal/compile_cache.py); off = none
    compile_cache_dir: Optional[str] = None
    compile: bool = False                   # torch: torch.compile each transformer block
    compile_backend: str = "inductor"       # torch: inductor | neuron (TorchNeuron)
    neuron: NeuronConfig = field(default_factory=NeuronConfig)


@dataclass
class ModelConfig:
    name: str = MISSING
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    max_position_embeddings: int = MISSING
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling: Any = None                # a dict (llama3 scaling) or null; Any for the reason given at hal.mesh
    initializer_range: float = 0.02


@dataclass
class DataConfig:
    # builtin:python_docs, a dataset directory from launch.prepare_data, or one on s3:// / gs:// (staged
    # into the cache); null when `sources` is given. Each data/ option sets both.
    path: Optional[str] = MISSING
    # a mixture instead of `path`: a list of {path: ..., weight: ..., name: ...}; Any for the reason at hal.mesh
    sources: Any = MISSING
    tokenizer: Optional[str] = None         # builtin corpus: bytes | train-bpe:N | a tokenizer.json; a dataset: checked
    vocab: VocabPolicy = VocabPolicy.check  # model.vocab_size: check it covers the tokenizer | set it | pad to 128s
    document_mask: bool = False             # attention stays inside each packed document; positions restart
    mixture_block_steps: int = 0            # steps over which mixture weights are exact; 0 = the fewest that are
    eval_fraction: float = 0.05             # the held-out tail of each source, never trained on


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on 2-D weights only, global-norm clipping; same on every backend."""
    lr: float = 3.0e-3
    schedule: Schedule = Schedule.cosine    # after linear warmup
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class ProfileConfig:
    """A profiler trace of a window of steps, written under run_dir/profile/ by every process."""
    steps: List[int] = field(default_factory=list)  # [first, last] step numbers as metrics.jsonl counts them; [] = off
    memory: bool = False                    # also a memory snapshot at the window's end (JAX: device memory
    #                                         profile; torch on CUDA: _record_memory_history pickle, on CPUs
    #                                         allocations in the trace)


@dataclass
class TrainerConfig:
    steps: int = 300
    global_batch: int = 16                  # sequences per optimizer update
    micro_batch: Optional[int] = None       # sequences per forward/backward; null = global_batch (no accumulation)
    seq_len: int = 128
    precision: Precision = Precision.fp32   # bf16: bf16 compute, fp32 params and optimizer state; fp8: the blocks'
    #                                         projections in float8 on fp8 GPUs (H100, H200, B200, L4, L40S), else bf16
    remat: bool = False                     # activation checkpointing
    # tokens per chunk of the cross-entropy: each chunk's logits are made and freed in turn, in the forward and
    # the backward, so a step never holds the [tokens, vocab] logits whole; 0 = the whole logits at once.
    # Under tensor parallelism (hal.mesh.tensor > 1) the loss takes the whole (vocab-split) logits
    loss_chunk: int = 4096
    log_every: int = 10
    eval_every: int = 100                   # 0 = never
    eval_batches: int = 4
    checkpoint_every: int = 100             # 0 = only at the end
    keep_checkpoints: int = 3               # the newest good checkpoints of this run kept
    # true: copy the state, write it while training goes on (committed a few steps later);
    # auto: true, except torch on CPUs (its threads lose more to the writer than a save takes)
    async_save: Any = "auto"
    checkpoint_dir: Optional[str] = None    # null = run_dir/checkpoints; or a directory, s3://bucket/prefix, gs://...
    resume: bool = True                     # continue from the run's checkpoints (false: refuse a run dir holding some)
    init_from: Optional[str] = None         # a checkpoint, checkpoints/ or run dir (any framework), or an HF directory
    init_weights_only: bool = False         # with init_from: take params only (fresh optimizer, step 0)
    precompile: bool = False                # trial run: compile the train/eval steps (fills caches), save nothing
    strict_resume: bool = False             # a damaged newest checkpoint: stop instead of resuming from an older one
    fresh_if_damaged: bool = False          # every checkpoint damaged: start from the reference init, not stop
    allow_setting_changes: bool = False     # resume a run dir with another checkpoint_dir, seed or data.path
    on_nonfinite: OnNonFinite = OnNonFinite.stop    # NaN/inf loss or gradient: stop (exit 4) | skip the update
    on_save_error: OnSaveError = OnSaveError.stop   # a checkpoint write fails: stop (exit 3) | continue training
    tensorboard: bool = True                # event files in run_dir/tensorboard (false: none, whatever `loggers` says)
    # where scalars and the resolved config go, from process 0: tensorboard, wandb (the wandb package; WANDB_MODE
    # and friends as usual), mlflow (MLFLOW_TRACKING_URI, default a file store in run_dir/mlruns)
    loggers: List[LoggerName] = field(default_factory=lambda: [LoggerName.tensorboard])
    experiment: str = "trichip"             # the W&B project and MLflow experiment of the run
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    sample_every: int = 0                   # every N steps a short sample of text to the log and TensorBoard; 0 = never
    sample_prompt: str = ""                 # the sample's prompt; "" = the start of a document
    sample_tokens: int = 32                 # tokens the sample generates
    sample_temperature: float = 0.0         # 0 = greedy; else sampled (top-k 50, seeded by seed and step)
    peak_tflops: Optional[float] = None     # per-device peak for MFU; known GPUs/TPUs are detected, CPUs need it


@dataclass
class TrainConfig:
    hal: HalConfig = field(default_factory=HalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    # The run directory: resolved config, metrics.jsonl, logs, checkpoints/<step>/. An existing run
    # directory is resumed from its latest checkpoint (trainer.resume=false refuses one).
    run_dir: str = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent); importing configs does it."""
    ConfigStore.instance().store(name="schema", node=TrainConfig)


def compose_config(overrides=(), return_hydra_config: bool = False):
    """The run config exactly as `python -m launch.train OVERRIDES` builds it (a DictConfig). Raises Hydra's
    errors for unknown keys, wrong types and bad group options (`explain` makes them one line)."""
    from hydra import compose as hydra_compose, initialize_config_module
    register()
    with initialize_config_module("configs", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def compose(overrides=(), resolve: bool = False) -> dict:
    """compose_config as a plain dict (enums as their names)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(compose_config(overrides), resolve=resolve, enum_to_str=True)


def explain(e: Exception) -> str:
    """A Hydra composition error as one line: its cause, the options of a group, the keys of a section."""
    text = str(e).strip()
    first = first_line(e, 1000)
    if first.startswith("Error merging override") and e.__cause__ is not None:
        cause = e.__cause__
        key = getattr(cause, "full_key", None)
        first = f"{key}: {first_line(cause)}" if key else f"{first}: {first_line(cause)}"
    if "Available options" in text:       # an unknown option of a config group (hal=..., model=...)
        block = text.split("Available options", 1)[1].split("Config search path")[0]
        first += f" (available: {', '.join(ln.strip() for ln in block.splitlines()[1:] if ln.strip())})"
    if first.startswith("Could not override '"):   # a key that is not in the config
        key = first.split("'")[1]
        parent, _, leaf = key.rpartition(".")
        first = f"unknown config key {key!r}"
        known = _known_keys(parent)
        if known:
            first += f"; keys{' in ' + parent if parent else ''} are: {', '.join(known)}"
    return first.replace("In 'train': ", "")


def _known_keys(parent: str) -> list[str]:
    try:
        node = compose_config()
        for part in filter(None, parent.split(".")):
            node = node[part]
        return sorted(str(k) for k in node.keys())
    except Exception:
        return []


def validate(plain: dict) -> None:
    """Check a plain config dict (however it was made) against the schema: unknown keys (also those added
    with Hydra's `+`), wrong types and enum members fail with one line, as models.errors.UserError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise UserError(f"{key}: {first_line(e)}" if key else first_line(e)) from None


def to_plain(cfg) -> dict:
    """A composed DictConfig as a plain dict with every interpolation resolved (enums as their names); a
    value left missing (`???`) or an interpolation that does not resolve is a UserError of one line."""
    from omegaconf import OmegaConf
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except Exception as e:  # OmegaConf's missing-value and interpolation errors have no common public base
        key = getattr(e, "full_key", None) or explain(e)
        raise UserError(f"{key} has no value: set it on the command line ({key}=...)") from None


register()
