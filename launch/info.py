"""python -m launch.info — what this machine can train on: frameworks, versions, devices, and for each
target (CPU, GPU, TPU, Trainium) whether it runs here and, if not, what to install.

python -m launch.info [--devices N] OVERRIDES... (launch.train's, e.g. hal=torch model=small
'hal.mesh={fsdp:4,tensor:2}') adds the per-device bytes of that run's layout: parameters, optimizer state,
activations and the rest of a train step, as launch.planner estimates them (the run's log measures them).
N devices: by default the product of hal.mesh's sizes."""
from __future__ import annotations

import importlib.metadata
import json
import sys

from hal import jax_devices, torch_devices
from hal.mesh import instance_type as configured_instance_type
from hal.neuron import INSTALL as NEURON_INSTALL, NeuronProbe, jax_install, verdict


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict:
    versions = {d: _version(d) for d in ("jax", "jaxlib", "flax", "optax", "torch", "orbax-checkpoint",
                                         "hydra-core", "torch-neuronx", "torch-xla", "jax-neuronx", "libneuronxla")}
    jax_dev, torch_dev, probe = jax_devices(), torch_devices(), NeuronProbe.detect()
    targets = {
        "cpu": {"jax": bool(jax_dev.get("cpu")), "torch": bool(torch_dev),
                "install": "pip install torch==2.13.0 && pip install -e '.[all]'"},
        "gpu": {"jax": bool(jax_dev.get("gpu")), "torch": bool(torch_dev.get("gpu")),
                "install": "pip install 'jax[cuda12]' and a CUDA build of torch, on a machine with NVIDIA GPUs"},
        "tpu": {"jax": bool(jax_dev.get("tpu")), "torch": False,
                "install": "pip install 'jax[tpu]' on a Cloud TPU VM (hal=jax only)"},
        "neuron": {"jax": probe.jax_plugin, "torch": probe.torch_neuron_device or probe.torch_xla,
                   "install": f"trn2/trn3: {NEURON_INSTALL['torchneuron']}; any Trainium: "
                              f"{jax_install(versions['jax'])}; trn1 with torch: {NEURON_INSTALL['torch-xla']}"},
    }
    instance = configured_instance_type(None)
    return {"python": sys.version.split()[0], "versions": {k: v for k, v in versions.items() if v},
            "devices": {"jax": jax_dev, "torch": torch_dev, "neuron_devices": probe.neuron_devices},
            "targets": targets, "trainium": {"instance_type": instance, **verdict(probe, instance)}}


def layout(overrides: list[str], devices: int | None) -> dict:
    """The mesh a run with these launch.train overrides builds on `devices` devices, and the per-device bytes
    of its train step by part (launch.planner.memory)."""
    from configs.schema import compose
    from hal import mesh as meshlib
    from hal.base import UserError
    from launch import planner
    from models.spec import LlamaConfig
    cfg = compose(overrides)
    hal, t = cfg["hal"], cfg["trainer"]
    sizes = dict(hal["mesh"] or {})
    if devices is None:
        if not sizes or any(v == -1 for v in sizes.values()):
            raise UserError("launch.info: give --devices N, or every axis of hal.mesh, to size the layout")
        devices = 1
        for v in sizes.values():
            devices *= v
    mesh, source = meshlib.choose(sizes or None, hal["mesh_rule"], meshlib.instance_type(hal["instance_type"]),
                                  devices)
    model = LlamaConfig.from_dict(cfg["model"])
    meshlib.check_tensor_degree(model, mesh["tensor"], hal["framework"])
    family = {"neuron": "trainium"}.get(hal["platform"], hal["platform"] if hal["platform"] != "auto" else "cpu")
    micro = t["micro_batch"] or t["global_batch"]
    parts = planner.memory(model, mesh, hal["framework"], micro, t["seq_len"], t["precision"], t["remat"],
                           planner.attention_kind(family, hal["framework"], t["precision"]),
                           accum=t["global_batch"] // micro, loss_chunk=t["loss_chunk"])
    shard = planner.shard_elements(model, mesh, hal["framework"])
    rest = {k: v for k, v in parts.items() if k != "params+moments"}
    return {"framework": hal["framework"], "devices": devices, "mesh": mesh, "mesh_source": source,
            "micro_batch": micro, "seq_len": t["seq_len"], "precision": t["precision"],
            "bytes_per_device": {"params": 4 * shard, "optimizer": 8 * shard, **rest}}


def _print_layout(lay: dict) -> None:
    b = lay["bytes_per_device"]
    print(f"layout: hal={lay['framework']} on {lay['devices']} devices, mesh {lay['mesh']} ({lay['mesh_source']}), "
          f"micro-batch {lay['micro_batch']} x {lay['seq_len']} tokens, {lay['precision']}")
    print("  per device: " + ", ".join(f"{k} {v / 2 ** 20:.2f} MiB" for k, v in b.items())
          + f"; total {sum(b.values()) / 2 ** 30:.3f} GiB (launch.planner's estimate)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    devices = int(argv[argv.index("--devices") + 1]) if "--devices" in argv else None
    info = report()
    if overrides or devices:
        from hal.base import UserError
        try:
            info["layout"] = layout(overrides, devices)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if "--json" in argv:
        print(json.dumps(info, indent=1))
        return 0
    print(f"python {info['python']}")
    if "layout" in info:
        _print_layout(info["layout"])
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"devices: jax {info['devices']['jax'] or '-'}, torch {info['devices']['torch'] or '-'}, "
          f"/dev/neuron* {info['devices']['neuron_devices']}")
    print(f"{'target':8} {'hal=jax':8} {'hal=torch':10} to run it here")
    for name, t in info["targets"].items():
        ok = t["jax"] or t["torch"]
        print(f"{name:8} {'yes' if t['jax'] else 'no':8} {'yes' if t['torch'] else 'no':10} "
              f"{'ready' if ok else t['install']}")
    trn = info["trainium"]
    print(f"trainium ({trn['instance_type'] or 'instance type not set: $TRICHIP_INSTANCE_TYPE'}):")
    for framework in ("torch", "jax"):
        v = trn[framework]
        if v["stack"] is None:
            print(f"  hal={framework}: no stack: {v['why']}")
        else:
            print(f"  hal={framework}: {v['stack']} ({', '.join(v['families'])}; {v['release']}); tested here "
                  f"without Trainium: {v['tested_here']}; never ran on Trainium: {v['never_ran']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
