"""python -m launch.info — what this machine can train on: frameworks, versions, devices, and for each
target (CPU, GPU, TPU, Trainium) whether it runs here and, if not, what to install."""
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = report()
    if "--json" in argv:
        print(json.dumps(info, indent=1))
        return 0
    print(f"python {info['python']}")
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
