"""How the PyTorch Llama is parallelized over a (data, fsdp, tensor) DeviceMesh: tensor parallelism with
DTensor (the Megatron/torchtitan layout) inside, FSDP2 around it.

Tensor parallelism follows the same logical axis rules as JAX (hal.mesh.LOGICAL_RULES over
models.spec.logical_axes): heads, kv_heads and mlp on `tensor`, so q/k/v and gate/up are column-parallel
(their output rows split) and o/down row-parallel (their input columns split); vocab on `tensor`, so the
embedding and the output layer are vocabulary-parallel and the loss is computed on the sharded logits
(torch's loss_parallel: no [tokens, vocab] all-gather). A vocabulary the tensor degree does not divide stays
replicated, as JAX leaves it. Between the blocks the residual stream and the norms are sequence-parallel:
each tensor rank holds seq_len / tensor positions, all-gathered before attention and the MLP and
reduce-scattered after them.

FSDP2 then shards every parameter's dim 0 (of the tensor rank's part) over fsdp, replicating over data
(HSDP) when data > 1. A rank's part of a 2-D weight is one block of the global array (`storage_spec`), which
is what the checkpoint store writes.
"""
from __future__ import annotations

import contextlib

from hal import mesh as meshlib
from models.spec import LlamaConfig, logical_axes, param_shapes


def tensor_dims(cfg: LlamaConfig, tensor: int) -> dict[str, int | None]:
    """{parameter name: the dim the tensor axis splits, or None (replicated over tensor ranks)}."""
    out = {}
    for name, shape in param_shapes(cfg).items():
        parts = meshlib.partition(logical_axes(name, shape), shape, {"tensor": tensor})
        out[name] = parts.index("tensor") if "tensor" in parts else None
    return out


def vocab_parallel(cfg: LlamaConfig, tensor: int) -> bool:
    return tensor > 1 and tensor_dims(cfg, tensor)["model.embed_tokens.weight"] == 0


def storage_spec(shape: tuple, tensor_dim: int | None, sizes: dict) -> tuple | None:
    """The block of the global array that one rank holds, as a JAX PartitionSpec tuple over the mesh axes
    (data, fsdp, tensor), or None where a rank's part is not one even block (written whole).

    FSDP2 splits dim 0 of the tensor rank's part over fsdp, so a column-parallel weight's dim 0 is split
    tensor-major: (tensor, fsdp)."""
    f, t = sizes["fsdp"], sizes["tensor"]
    if not shape:
        return ()
    rows = shape[0] // t if tensor_dim == 0 else shape[0]
    if (tensor_dim == 0 and shape[0] % t) or rows % f:
        return None
    dim0 = tuple(a for a, used in (("tensor", tensor_dim == 0 and t > 1), ("fsdp", f > 1)) if used)
    spec = [dim0[0] if len(dim0) == 1 else (dim0 or None)]
    spec += ["tensor" if tensor_dim == i and t > 1 else None for i in range(1, len(shape))]
    return tuple(spec)


def parallelize(net, tp_mesh, cfg: LlamaConfig) -> None:
    """Apply the tensor- and sequence-parallel plan to `net` (models.llama_torch.LlamaForCausalLM) in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)
    vocab = vocab_parallel(cfg, tp_mesh.size())
    if vocab:   # vocabulary-parallel: each rank looks up its rows, the sum is reduce-scattered over the sequence
        embed = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    else:       # replicated: each rank keeps its positions of the (identical) embeddings
        embed = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    plan = {"model.embed_tokens": embed, "model.norm": SequenceParallel()}
    if not cfg.tie_word_embeddings:
        plan["lm_head"] = (ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
                           if vocab else PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate(),
                                                            use_local_output=True))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update({
            p + "input_layernorm": SequenceParallel(),
            p + "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None)),
            p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
            p + "self_attn.v_proj": ColwiseParallel(),
            p + "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            p + "post_attention_layernorm": SequenceParallel(),
            p + "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
            p + "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    parallelize_module(net, tp_mesh, plan)
    if cfg.tie_word_embeddings:   # the head is F.linear(h, the embedding's weight): it takes h whole
        net.model.norm.register_forward_hook(_whole_sequence(keep_dtensor=vocab))


def _whole_sequence(keep_dtensor: bool):
    """A forward hook gathering the final norm's sequence-parallel output: a Replicate DTensor where the head's
    weight is vocabulary-parallel (the logits come out split like it), else a plain tensor."""
    from torch.distributed.tensor import Replicate

    def hook(_module, _inputs, out):
        whole = out.redistribute(placements=(Replicate(),))
        return whole if keep_dtensor else whole.to_local()
    return hook


def loss_context(vocab_sharded: bool):
    """The context of the loss and its backward: torch's loss_parallel where the logits are vocab-sharded."""
    if not vocab_sharded:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel
    return loss_parallel()
