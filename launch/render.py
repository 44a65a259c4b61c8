"""python -m launch.render <target> --image IMAGE [options] [-- HYDRA_OVERRIDES...]

Writes the Kubernetes manifest that runs `launch.train` on a cluster, as YAML (stdout, or
--out DIR/<name>.yaml). Targets:

  gke-tpu        JobSet (jobset.x-k8s.io/v1alpha2) over one TPU slice on GKE: one pod per TPU host,
                 `python -m launch.train hal=jax hal.distributed=true ...` (--tpu v5p|v6e --chips N)
  eks-trainium   PyTorchJob (kubeflow.org/v1) over Trainium nodes on EKS: one pod per node,
                 `torchrun ... -m launch.train hal=torch hal.platform=neuron ...`
                 (--instance trn1.32xlarge|trn2.48xlarge --nodes N)
  gpu            PyTorchJob over 8-GPU nodes (--cloud eks: p5.48xlarge, --cloud gke: a3-highgpu-8g),
                 `torchrun --nproc-per-node 8 -m launch.train hal=torch hal.platform=gpu ...` (--nodes N)
  skypilot       a SkyPilot task YAML (resources.accelerators, num_nodes, the train command) for a planner
                 target (--target 8xh100 | p5.48xlarge | tpu-v5p-128 | trn2.48xlarge | 32xtrn2 ...)

TPU slices take Google's accelerator types with Google's meaning (--accelerator-type v5p-128: v5p counts
TensorCores, 2 a chip, so 64 chips; v6e-16: 16 chips); the instance type the pods get is that name with a
"tpu-" prefix (tpu-v5p-128).

Every pod mounts the PersistentVolumeClaim --pvc (default trichip-runs; it must be ReadWriteMany,
e.g. Filestore, FSx for Lustre, EFS) at /runs, and the run directory is /runs/<name> unless the
overrides set run_dir: every process must see the same run dir, and a re-applied job resumes from
its latest checkpoint there.

The overrides are composed with the trichip config (Hydra's compose API) before anything is written,
so a bad override fails here, as one line `error: ...` and exit code 2, not on the cluster.
(Slurm: use the Hydra launcher preset instead: python -m launch.train -m hydra/launcher=slurm_gpu ...)
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
RUNS_MOUNT = "/runs"
MAX_NAME = 40   # pods and services get "-slice-0-12" / "-worker-127" appended; Kubernetes allows 63

# --- the chips: facts per accelerator, as data ---------------------------------------------------------------

# GKE TPU slices: the node label value, chips per TPU VM (host), and the topology dimensions.
TPU = {
    "v5p": {"accelerator": "tpu-v5p-slice", "dims": 3},    # 4 chips per host, 3-D torus
    "v6e": {"accelerator": "tpu-v6e-slice", "dims": 2},    # 2-D; 1, 4 or 8 chips on one host, else 4 a host
}
V6E_TOPOLOGY = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

# EKS Trainium nodes: Neuron devices (the aws.amazon.com/neuron resource), NeuronCores torchrun starts
# one process for, EFA interfaces, and the Neuron environment.
TRAINIUM = {
    "trn1.32xlarge": {"neuron_devices": 16, "cores": 32, "efa": 8,
                      "env": {"NEURON_CC_FLAGS": "--model-type=transformer"}},
    # Trainium2: 8 physical cores a device, paired into 4 logical cores (LNC=2); compiler and runtime must agree.
    "trn2.48xlarge": {"neuron_devices": 16, "cores": 64, "efa": 16,
                      "env": {"NEURON_LOGICAL_NC_CONFIG": "2",
                              "NEURON_CC_FLAGS": "--model-type=transformer --logical-nc-config=2"}},
}
NEURON_ENV = {
    "NEURON_RT_NUM_CORES": "1",                        # per process: torchrun starts one per NeuronCore
    "NEURON_COMPILE_CACHE_URL": "/cache/neuron",       # compiled graphs, kept on the node across runs
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",
    "FI_EFA_FORK_SAFE": "1",
}
NEURON_CACHE_HOST_PATH = "/var/cache/trichip-neuron"

# 8-GPU nodes per cloud: the node selector that picks the node pool, and EFA interfaces (EKS).
GPU = {
    "eks": {"p5.48xlarge": {"node_selector": {"node.kubernetes.io/instance-type": "p5.48xlarge"}, "efa": 32},
            "p5e.48xlarge": {"node_selector": {"node.kubernetes.io/instance-type": "p5e.48xlarge"}, "efa": 32}},
    "gke": {"a3-highgpu-8g": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, "efa": 0},
            "a3-megagpu-8g": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-mega-80gb"},
                              "efa": 0}},
}
GPUS_PER_NODE = 8
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}


class UsageError(Exception):
    """Something the user changes on the command line; printed as one line."""


# --- TPU slice geometry --------------------------------------------------------------------------------------

def tpu_topology(tpu: str, chips: int) -> str:
    """The default slice shape for a chip count: v5p doubles the smallest dimension of 2x2x1 (the last
    one on ties) until it holds `chips` (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...); v6e has fixed shapes."""
    if tpu == "v6e":
        if chips not in V6E_TOPOLOGY:
            raise UsageError(f"--tpu v6e --chips {chips}: a v6e slice has {', '.join(map(str, V6E_TOPOLOGY))} chips")
        return V6E_TOPOLOGY[chips]
    if chips < 4 or chips & (chips - 1):
        raise UsageError(f"--tpu v5p --chips {chips}: give a power of two >= 4 (4, 8, 16, ...), "
                         f"or the slice shape with --topology AxBxC")
    dims = [2, 2, 1]
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return "x".join(map(str, dims))


def chips_per_host(tpu: str, chips: int) -> int:
    if tpu == "v6e" and chips <= 8:
        return chips           # ct6e-standard-1t / -4t / -8t: the whole slice on one host
    return 4


def check_topology(tpu: str, topology: str, chips: int) -> None:
    dims = topology.split("x")
    if len(dims) != TPU[tpu]["dims"] or not all(d.isdigit() and int(d) > 0 for d in dims):
        example = "2x2x4" if TPU[tpu]["dims"] == 3 else "4x4"
        raise UsageError(f"--topology {topology!r}: a {tpu} slice shape has {TPU[tpu]['dims']} dimensions, "
                         f"like {example}")
    product = math.prod(int(d) for d in dims)
    if product != chips:
        raise UsageError(f"--topology {topology} holds {product} chips but --chips is {chips}; make them agree")


# --- Kubernetes pieces ---------------------------------------------------------------------------------------

def env_list(env: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": str(v)} for k, v in env.items()]


def volumes(pvc: str, neuron_cache: bool = False) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): the run dir PVC, a RAM-backed /dev/shm (torch and the Neuron runtime
    need far more than the default 64 MiB), and for Trainium the node's compile cache."""
    vols = [{"name": "runs", "persistentVolumeClaim": {"claimName": pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "runs", "mountPath": RUNS_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if neuron_cache:
        vols.append({"name": "neuron-cache", "hostPath": {"path": NEURON_CACHE_HOST_PATH, "type": "DirectoryOrCreate"}})
        mounts.append({"name": "neuron-cache", "mountPath": "/cache"})
    return vols, mounts


def pytorchjob(name: str, nodes: int, pod_spec: dict) -> dict:
    """kubeflow.org/v1 PyTorchJob: a Master pod and nodes-1 Worker pods with the same spec. The training
    operator gives every pod MASTER_ADDR, MASTER_PORT and RANK (the pod's index), which the container's
    torchrun command reads as $(VAR) (Kubernetes expands those in command)."""
    specs = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": {"spec": pod_spec}}}
    if nodes > 1:
        specs["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure", "template": {"spec": pod_spec}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "trichip"}},
            "spec": {"runPolicy": {"backoffLimit": 3}, "pytorchReplicaSpecs": specs}}


def torchrun(nodes: int, nproc: int) -> list[str]:
    return ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(nproc), "--node-rank", "$(RANK)",
            "--master-addr", "$(MASTER_ADDR)", "--master-port", "$(MASTER_PORT)", "-m", "launch.train"]


# --- targets: (manifest, the launch.train overrides in its command) -------------------------------------------

def render_gke_tpu(args, name: str, overrides: list[str]) -> dict:
    topology = args.topology or tpu_topology(args.tpu, args.chips)
    check_topology(args.tpu, topology, args.chips)
    per_host = chips_per_host(args.tpu, args.chips)
    hosts = args.chips // per_host
    job = "slice"
    vols, mounts = volumes(args.pvc)
    # JobSet gives pod i of the slice the hostname <name>-slice-0-<i> under the headless service <name>:
    # JAX's GKE TPU cluster detection (jax.distributed.initialize() with no arguments) reads the
    # hosts and this host's index from TPU_WORKER_HOSTNAMES / TPU_WORKER_ID.
    hostnames = ",".join(f"{name}-{job}-0-{i}.{name}" for i in range(hosts))
    env = env_list({"PYTHONUNBUFFERED": "1", "TPU_WORKER_HOSTNAMES": hostnames})
    env.append({"name": "TPU_WORKER_ID", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    container = {
        "name": "trichip", "image": args.image,
        "command": ["python", "-m", "launch.train", *overrides],
        "env": env,
        "ports": [{"containerPort": 8471, "name": "tpu-ici"}, {"containerPort": 8476, "name": "jax-coordinator"}],
        "resources": {"requests": {"google.com/tpu": per_host}, "limits": {"google.com/tpu": per_host}},
        "volumeMounts": mounts,
    }
    pod = {"restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
           "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": TPU[args.tpu]["accelerator"],
                            "cloud.google.com/gke-tpu-topology": topology},
           "tolerations": [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
           "containers": [container], "volumes": vols}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "trichip"},
                         # one slice per node pool: all hosts of the slice land in the same pool
                         "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
            "spec": {"failurePolicy": {"maxRestarts": 3},   # a restart resumes from the latest checkpoint
                     "replicatedJobs": [{"name": job, "replicas": 1, "template": {"spec": {
                         "parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
                         "template": {"spec": pod}}}}]}}


def render_eks_trainium(args, name: str, overrides: list[str]) -> dict:
    node = TRAINIUM[args.instance]
    vols, mounts = volumes(args.pvc, neuron_cache=True)
    resources = {"aws.amazon.com/neuron": node["neuron_devices"], "vpc.amazonaws.com/efa": node["efa"]}
    container = {"name": "pytorch",   # the training operator looks for this container name
                 "image": args.image,
                 "command": torchrun(args.nodes, node["cores"]) + overrides,
                 "env": env_list({"PYTHONUNBUFFERED": "1", **NEURON_ENV, **node["env"]}),
                 "ports": [{"containerPort": 23456, "name": "pytorchjob-port"}],
                 "resources": {"requests": resources, "limits": resources},
                 "volumeMounts": mounts}
    pod = {"nodeSelector": {"node.kubernetes.io/instance-type": args.instance},
           "tolerations": [{"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}],
           "containers": [container], "volumes": vols}
    return pytorchjob(name, args.nodes, pod)


def render_gpu(args, name: str, overrides: list[str]) -> dict:
    node = GPU[args.cloud][args.instance]
    vols, mounts = volumes(args.pvc)
    resources = {"nvidia.com/gpu": GPUS_PER_NODE}
    env = {"PYTHONUNBUFFERED": "1"}
    if node["efa"]:
        resources["vpc.amazonaws.com/efa"] = node["efa"]
        env.update(EFA_ENV)
    container = {"name": "pytorch", "image": args.image,
                 "command": torchrun(args.nodes, GPUS_PER_NODE) + overrides,
                 "env": env_list(env),
                 "ports": [{"containerPort": 23456, "name": "pytorchjob-port"}],
                 "resources": {"requests": resources, "limits": resources},
                 "volumeMounts": mounts}
    pod = {"nodeSelector": dict(node["node_selector"]),
           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
           "containers": [container], "volumes": vols}
    return pytorchjob(name, args.nodes, pod)


# SkyPilot accelerator names (`sky show-gpus`); TPU slices are named by their accelerator type.
SKYPILOT_ACCELERATORS = {"h100": "H100", "h200": "H200", "trn1": "Trainium", "trn2": "Trainium2"}


def render_skypilot(args, name: str, overrides: list[str]) -> dict:
    """A SkyPilot task (docs.skypilot.co/en/latest/reference/yaml-spec.html): one node per instance (a TPU
    slice is one node whose hosts all run `run`). Multi-node torch runs start torchrun on every node from
    SkyPilot's SKYPILOT_NODE_RANK / SKYPILOT_NODE_IPS / SKYPILOT_NUM_NODES."""
    from launch.planner import load_catalog
    t = args.parsed_target
    spec = load_catalog()["chips"][t.chip]
    resources: dict = {}
    if t.chip in ("v5e", "v5p", "v6e"):
        gen = "v5litepod" if t.chip == "v5e" else t.chip
        resources["accelerators"] = f"tpu-{gen}-{t.instance_type.rsplit('-', 1)[1]}"
        resources["infra"] = "gcp"
        run = shlex.join(["python", "-m", "launch.train", *overrides])
        nodes = 1
    else:
        per_node = t.chips // t.nodes
        resources["accelerators"] = f"{SKYPILOT_ACCELERATORS[t.chip]}:{per_node}"
        if t.instance_type and t.nodes * per_node == t.chips and t.instance_type in TRAINIUM_OR_GPU_INSTANCES:
            resources["instance_type"] = t.instance_type
            resources["infra"] = "gcp" if t.instance_type.startswith("a3-") else "aws"
        nodes = t.nodes
        nproc = per_node * spec["devices_per_chip"]
        run = ('MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)\n'
               f"torchrun --nnodes $SKYPILOT_NUM_NODES --nproc-per-node {nproc} --node-rank $SKYPILOT_NODE_RANK "
               f"--master-addr $MASTER_ADDR --master-port 29500 -m launch.train {shlex.join(overrides)}")
    task = {"name": name, "num_nodes": nodes, "resources": resources, "workdir": ".",
            "envs": {"PYTHONUNBUFFERED": "1", **(TRAINIUM[t.instance_type]["env"] if t.instance_type in TRAINIUM
                                                  else {})},
            "setup": args.setup, "run": run + "\n"}
    return task


TRAINIUM_OR_GPU_INSTANCES = ("p5.48xlarge", "p5e.48xlarge", "a3-highgpu-8g", "a3-megagpu-8g", "a3-ultragpu-8g",
                             "trn1.32xlarge", "trn2.48xlarge")


def fixed_overrides(args) -> list[str]:
    """The overrides a target sets itself: the framework, platform and instance type its nodes need."""
    if args.target == "gke-tpu":
        from launch.planner import tpu_instance_type
        return ["hal=jax", "hal.distributed=true", f"hal.instance_type={tpu_instance_type(args.tpu, args.chips)}"]
    if args.target == "skypilot":
        t = args.parsed_target
        if t.chip in ("v5e", "v5p", "v6e"):
            return ["hal=jax", "hal.distributed=true", f"hal.instance_type={t.instance_type}"]
        platform = "neuron" if t.chip.startswith("trn") else "gpu"
        return ["hal=torch", f"hal.platform={platform}"] + ([f"hal.instance_type={t.instance_type}"]
                                                              if t.instance_type else [])
    if args.target == "eks-trainium":
        return ["hal=torch", "hal.platform=neuron", f"hal.instance_type={args.instance}"]
    return ["hal=torch", "hal.platform=gpu", f"hal.instance_type={args.instance}"]


def default_name(args, model: str) -> str:
    if args.target == "skypilot":
        chips = args.parsed_target.name
    elif args.target == "gke-tpu":
        chips = f"{args.tpu}-{args.chips}"
    elif args.target == "eks-trainium":
        chips = f"{args.instance.split('.')[0]}-{args.nodes}"
    else:
        chips = f"{args.cloud}-gpu-{args.nodes}x{GPUS_PER_NODE}"
    return re.sub(r"[^a-z0-9-]+", "-", f"trichip-{model}-{chips}".lower()).strip("-")[:MAX_NAME].rstrip("-")


def check_name(name: str) -> None:
    if len(name) > MAX_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise UsageError(f"--name {name!r} is not a usable Kubernetes name: use at most {MAX_NAME} lowercase "
                         f"letters, digits and '-', starting with a letter and ending with a letter or digit")


# --- composing the config (the validation) -------------------------------------------------------------------

def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose(overrides: list[str]):
    """The trichip config for these overrides, exactly as launch.train composes it; a bad override is
    a UsageError with launch.train's one-line message."""
    from configs.schema import compose_config, explain
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue
    try:
        cfg = compose_config(overrides)
    except Exception as e:  # Hydra's composition and override errors have no common base class
        raise UsageError(explain(e)) from None
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise UsageError(f"{e.full_key} has no value: set it in the overrides ({e.full_key}=...)") from None
    return cfg


def render(args) -> tuple[str, dict]:
    """(name, manifest) for parsed arguments; raises UsageError."""
    user = list(args.overrides)
    for o in user:
        if "=" not in o or o.startswith("-"):
            raise UsageError(f"{o!r} is not a Hydra override (key=value); put launch.train overrides after --")
    fixed = fixed_overrides(args)
    taken = {override_key(o): o for o in fixed}
    for o in user:
        if override_key(o) in taken:
            raise UsageError(f"{args.target} sets {taken[override_key(o)]} itself; remove {o!r} from the overrides")
    cfg = compose(fixed + user)
    name = args.name or default_name(args, str(cfg.model.name))
    check_name(name)
    if not any(override_key(o) == "run_dir" for o in user):
        user.append(f"run_dir={'runs' if args.target == 'skypilot' else RUNS_MOUNT}/{name}")
    overrides = fixed + user
    compose(overrides)   # the command's overrides, exactly as the pods will pass them
    if args.target == "gke-tpu":
        return name, render_gke_tpu(args, name, overrides)
    if args.target == "eks-trainium":
        return name, render_eks_trainium(args, name, overrides)
    if args.target == "skypilot":
        return name, render_skypilot(args, name, overrides)
    return name, render_gpu(args, name, overrides)


def to_yaml(manifest: dict, argv: list[str]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):   # Master and Worker share one pod spec: write it out twice
            return True

    header = f"# rendered by: python -m launch.render {shlex.join(argv)}\n"
    return header + yaml.dump(manifest, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)


# --- command line --------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line and exit 2 (in main), like every other user error
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launch.render", description=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="target", required=True, metavar="{gke-tpu,eks-trainium,gpu,skypilot}",
                           parser_class=_Parser)

    def target(name: str, about: str) -> argparse.ArgumentParser:
        t = sub.add_parser(name, help=about, description=about)
        t.add_argument("--image", required=True, help="container image with trichip installed (pip install -e '.[...]')")
        t.add_argument("--name", help=f"job name, also the run dir /runs/NAME (default: trichip-<model>-<chips>; "
                                      f"at most {MAX_NAME} characters)")
        t.add_argument("--out", metavar="DIR", help="write DIR/<name>.yaml (default: stdout)")
        t.add_argument("--pvc", default="trichip-runs",
                       help="ReadWriteMany PersistentVolumeClaim mounted at /runs (default: trichip-runs)")
        t.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="launch.train Hydra overrides (after --)")
        return t

    tpu = target("gke-tpu", "JobSet over one TPU slice on GKE (hal=jax, one process per TPU host)")
    tpu.add_argument("--tpu", choices=sorted(TPU), default="v5p")
    tpu.add_argument("--chips", type=int, help="chips in the slice (v5p: 4, 8, 16, ...)")
    tpu.add_argument("--accelerator-type", help="Google's name instead of --tpu/--chips: v5p-128 (TensorCores: "
                                                "64 chips), v6e-16 (16 chips)")
    tpu.add_argument("--topology", help="slice shape, e.g. 2x2x4 (default: the usual shape for --chips)")

    trn = target("eks-trainium", "PyTorchJob over Trainium nodes on EKS (hal=torch, one process per NeuronCore)")
    trn.add_argument("--instance", choices=sorted(TRAINIUM), default="trn1.32xlarge")
    trn.add_argument("--nodes", type=int, default=1)

    gpu = target("gpu", "PyTorchJob over 8-GPU nodes on EKS or GKE (hal=torch, one process per GPU)")
    gpu.add_argument("--cloud", choices=sorted(GPU), required=True)
    gpu.add_argument("--instance", help="eks: p5.48xlarge (default), p5e.48xlarge; "
                                        "gke: a3-highgpu-8g (default), a3-megagpu-8g")
    gpu.add_argument("--nodes", type=int, default=1)

    sky = target("skypilot", "SkyPilot task YAML for a planner target (sky launch FILE)")
    sky.add_argument("--target", dest="target_name", required=True, help="an instance type, TPU accelerator type or NxCHIP "
                                                     "(as python -m launch.plan takes them)")
    sky.add_argument("--setup", default="pip install -e '.[jax,torch]'", help="the task's setup command")
    return p


def parse_tpu_args(args) -> None:
    """--accelerator-type (Google's naming) or --tpu/--chips, into args.tpu and args.chips."""
    if args.accelerator_type:
        from launch.planner import tpu_slice
        from models.errors import UserError
        if args.chips:
            raise UsageError("give --accelerator-type or --chips, not both")
        try:
            found = tpu_slice(args.accelerator_type)
        except UserError as e:
            raise UsageError(f"--accelerator-type {e}") from None
        if not found or found[0] not in TPU:
            raise UsageError(f"--accelerator-type {args.accelerator_type!r}: give v5p-N (TensorCores) or v6e-N (chips)")
        args.tpu, args.chips = found[0], found[1]
    elif args.chips is None:
        raise UsageError("give --chips N (chips in the slice) or --accelerator-type (e.g. v5p-128)")


def parse(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if getattr(args, "nodes", 1) < 1:
        raise UsageError(f"--nodes {args.nodes}: give at least 1 node")
    if args.target == "gke-tpu":
        parse_tpu_args(args)
    if args.target == "skypilot":
        from launch.planner import load_catalog, parse_target
        from models.errors import UserError
        try:
            args.parsed_target = parse_target(args.target_name, load_catalog())
        except UserError as e:
            raise UsageError(f"--target {e}") from None
    if args.target == "gke-tpu" and args.chips < 1:
        raise UsageError(f"--chips {args.chips}: give the slice's chip count (v5p: 4, 8, 16, ...)")
    if args.target == "gpu":
        known = GPU[args.cloud]
        args.instance = args.instance or next(iter(known))
        if args.instance not in known:
            raise UsageError(f"--cloud {args.cloud} --instance {args.instance}: known {args.cloud} instances are "
                             f"{', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        name, manifest = render(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    text = to_yaml(manifest, argv)
    if args.out:
        path = Path(args.out) / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}; submit with: kubectl apply -f {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
