"""Offline checks of the deployment files in cluster/: no cloud, no Kubernetes, no network.

The Ray cluster launcher YAMLs go through Ray's own config path, the one ``ray up`` takes before
it touches a cloud: ``prepare_config`` (merges the provider's ``defaults.yaml``, which ships
inside the ray package, merges the setup commands, checks the docker section, fills each node
type's min/max workers) and ``validate_config`` (Ray's JSON schema, ``ray-schema.json``, which
rejects unknown keys at the top level and inside node types). Both are local. What needs
credentials and the network is the provider's ``bootstrap_config`` (IAM roles, key pairs,
subnets, security groups on AWS; the Compute API on GCP), which ``ray up`` runs next and which
these tests do not call. The ``node_config`` sections go to the cloud's API as they are and no
schema here checks them.

The KubeRay manifests have no validator in Python; ``kuberay_errors`` checks them against field
lists written down from the KubeRay v1.7.0 CRDs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
KUBERAY_FILES = ("raycluster.yaml", "rayjob.yaml", "serviceaccount.yaml", "pvc.yaml")
CLUSTER_CONFIGS = ROOT / "configs" / "arms" / "cluster"

ENGINE, TRAIN = "engine-gpu", "train-8gpu"  # node type (launcher) = worker group (KubeRay) names
# The shared mount: an option every file keeps (commented out, or pvc.yaml), never the default.
SHARED = "/mnt/palign"
ENTRYPOINT = "python ray_jobs/pipeline.py --config configs/arms/cluster/palign.yaml"
# palign with vLLM, at the locked versions.
VLLM_INSTALL = re.compile(r"pip install -c \"\$HOME/palign/requirements/gpu\.lock\" "
                          r".*palign\[vllm\]")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ray_checked(cfg: dict) -> dict:
    """What ``ray up`` does to a config before any cloud call; raises on an invalid one."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _job_env() -> dict[str, str]:
    """The env vars every job gets (``ray job submit --runtime-env ray_jobs/runtime_env.yaml``)."""
    return _load(ROOT / "ray_jobs" / "runtime_env.yaml")["env_vars"]


def test_job_env_names_come_from_the_one_list() -> None:
    """A job's variables are the ones a local run forwards to its workers: one list of names."""
    from palign.runtime.environment import FORWARDED_ENV

    assert set(_job_env()) <= set(FORWARDED_ENV), set(_job_env()) - set(FORWARDED_ENV)


def _active_text(path: Path) -> str:
    """A YAML file without its comments (the options it only describes)."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def _dockerfile_base() -> str:
    match = re.search(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert match, "cluster/Dockerfile has no FROM line"
    return match.group(1)


# ------------------------------------------------------------------ Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_validator(name):
    cfg = _ray_checked(_load(CLUSTER / name))
    assert cfg["provider"]["type"] == name.removesuffix(".yaml")


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_layout(name):
    cfg = _ray_checked(_load(CLUSTER / name))
    types = cfg["available_node_types"]

    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # nothing scheduled on the head
    assert head["max_workers"] == 0

    assert set(types) == {cfg["head_node_type"], ENGINE, TRAIN}
    engine, train = types[ENGINE], types[TRAIN]
    assert engine["resources"]["GPU"] == 1 and engine["min_workers"] == 0
    assert train["resources"]["GPU"] == 8 and train["min_workers"] == 0
    assert engine["max_workers"] >= 1 and train["max_workers"] >= 1
    assert cfg["max_workers"] >= engine["max_workers"] + train["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0

    # setup_commands are merged into both lists: every node installs palign with vLLM and
    # keeps the model caches on its own disk, where the jobs' runtime env puts them too.
    job_env = _job_env()
    assert not job_env["PALIGN_CACHE_DIR"].startswith(SHARED)
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = "\n".join(cfg[key])
        assert VLLM_INSTALL.search(commands), key
        for var in ("PALIGN_CACHE_DIR", "HF_HOME"):
            assert f"{var}={job_env[var]}" in commands, (key, var)
        assert "RAY_AUTH_MODE=token" in commands, key
    cloud_sdk = {"aws": "boto3", "gcp": "google-api-python-client"}[cfg["provider"]["type"]]
    assert cloud_sdk in "\n".join(cfg["head_setup_commands"])  # the autoscaler needs it

    assert "." in cfg["file_mounts"].values()  # the repo, from where `ray up` runs
    assert cfg["docker"]["image"] == _dockerfile_base()

    # The runs' data are on a bucket: no shared mount by default, and every worker has its own
    # credentials for it (the head gets Ray's default instance profile / service account).
    assert SHARED not in _active_text(CLUSTER / name), name
    assert not any(SHARED in opt for opt in cfg["docker"]["run_options"])
    assert f"# - -v {SHARED}:{SHARED}" in (CLUSTER / name).read_text()  # the option, documented
    for node_type in (ENGINE, TRAIN):
        node_config = types[node_type]["node_config"]
        if cfg["provider"]["type"] == "aws":
            assert node_config["IamInstanceProfile"].get("Name") or \
                node_config["IamInstanceProfile"].get("Arn"), node_type
        else:
            (account,) = node_config["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com"), node_type
            assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]


def _misspell_top_level(cfg: dict) -> str:
    cfg["max_worker"] = cfg.pop("max_workers")
    return "max_worker"


def _misspell_in_node_type(cfg: dict) -> str:
    node_type = cfg["available_node_types"][ENGINE]
    node_type["min_worker"] = node_type.pop("min_workers")
    return "min_worker"


@pytest.mark.parametrize("misspell", [_misspell_top_level, _misspell_in_node_type])
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_validator_rejects_misspelt_keys(name, misspell):
    cfg = _load(CLUSTER / name)
    bad_key = misspell(cfg)
    with pytest.raises(jsonschema.ValidationError, match=f"'{bad_key}'"):
        _ray_checked(cfg)


# ------------------------------------------------------------------ KubeRay

# Every field the KubeRay v1.7.0 CRDs define at these levels (ray-operator/config/crd/bases/
# ray.io_rayclusters.yaml and ray.io_rayjobs.yaml, version v1), and the ones they require. A
# misspelt key is unknown: the API server rejects it under strict field validation and drops it
# otherwise, so the field silently keeps its default.
RAYCLUSTER_SPEC_FIELDS = frozenset({
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy",
    "networkPolicy", "rayVersion", "suspend", "tlsOptions", "upgradeStrategy",
    "workerGroupSpecs",
})
HEAD_GROUP_FIELDS = frozenset({
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
    "serviceType", "template",
})
WORKER_GROUP_FIELDS = frozenset({
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
})
AUTOSCALER_OPTIONS_FIELDS = frozenset({
    "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
    "resources", "securityContext", "upscalingMode", "version", "volumeMounts",
})
AUTH_OPTIONS_FIELDS = frozenset({"enableK8sTokenAuth", "mode", "secretName"})
RAYJOB_SPEC_FIELDS = frozenset({
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
    "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished",
})
CRD_REQUIRED = {
    "cluster spec": {"headGroupSpec"},
    "head group": {"template"},
    "worker group": {"groupName", "minReplicas", "maxReplicas", "template"},
}
# Ours on top (KubeRay has defaults for these, but these files spell them out).
OUR_REQUIRED = {
    "cluster spec": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                     "workerGroupSpecs"},
    "head group": {"rayStartParams"},
    "worker group": {"rayStartParams", "replicas"},
    "job spec": {"entrypoint", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
                 "ttlSecondsAfterFinished"},
}


def _check_fields(obj, where: str, known: frozenset, required: set, errors: list[str]) -> bool:
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected a mapping, got {type(obj).__name__}")
        return False
    errors += [f"{where}.{key}: unknown field" for key in sorted(set(obj) - known)]
    errors += [f"{where}.{key}: required field missing" for key in sorted(required - set(obj))]
    return True


def _pod_template_errors(template, where: str, errors: list[str]) -> None:
    containers = template.get("spec", {}).get("containers") if isinstance(template, dict) else None
    if not containers:
        errors.append(f"{where}.spec.containers: required, at least one container")
        return
    for i, container in enumerate(containers):
        for key in ("name", "image"):
            if not container.get(key):
                errors.append(f"{where}.spec.containers[{i}].{key}: required field missing")


def _cluster_spec_errors(spec, where: str, errors: list[str]) -> None:
    required = CRD_REQUIRED["cluster spec"] | OUR_REQUIRED["cluster spec"]
    if not _check_fields(spec, where, RAYCLUSTER_SPEC_FIELDS, required, errors):
        return
    if "autoscalerOptions" in spec:
        _check_fields(spec["autoscalerOptions"], f"{where}.autoscalerOptions",
                      AUTOSCALER_OPTIONS_FIELDS, set(), errors)
    if "authOptions" in spec:
        _check_fields(spec["authOptions"], f"{where}.authOptions", AUTH_OPTIONS_FIELDS, set(),
                      errors)
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}.enableInTreeAutoscaling: must be true")
    head = spec.get("headGroupSpec")
    required = CRD_REQUIRED["head group"] | OUR_REQUIRED["head group"]
    if head is not None and _check_fields(head, f"{where}.headGroupSpec", HEAD_GROUP_FIELDS,
                                          required, errors):
        _pod_template_errors(head.get("template"), f"{where}.headGroupSpec.template", errors)
    groups = spec.get("workerGroupSpecs") or []
    required = CRD_REQUIRED["worker group"] | OUR_REQUIRED["worker group"]
    for i, group in enumerate(groups):
        group_where = f"{where}.workerGroupSpecs[{i}]"
        if _check_fields(group, group_where, WORKER_GROUP_FIELDS, required, errors):
            _pod_template_errors(group.get("template"), f"{group_where}.template", errors)


def kuberay_errors(doc: dict) -> list[str]:
    """The problems with one KubeRay manifest document (empty: none found)."""
    errors: list[str] = []
    kind = doc.get("kind")
    expected_api = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1",
                    "PersistentVolumeClaim": "v1", "ServiceAccount": "v1"}
    if kind not in expected_api:
        return [f"kind: unexpected {kind!r}"]
    if doc.get("apiVersion") != expected_api[kind]:
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {expected_api[kind]!r}")
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name: required field missing")
    if kind == "ServiceAccount":  # no spec
        return errors
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return [*errors, "spec: required mapping missing"]
    if kind == "RayCluster":
        _cluster_spec_errors(spec, "spec", errors)
    elif kind == "RayJob":
        if _check_fields(spec, "spec", RAYJOB_SPEC_FIELDS, OUR_REQUIRED["job spec"], errors):
            if "rayClusterSpec" in spec:
                _cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec", errors)
    elif not spec.get("accessModes") or not spec.get("resources", {}).get("requests", {}).get(
            "storage"):
        errors.append("spec: a claim needs accessModes and resources.requests.storage")
    return errors


def _doc(name: str, kind: str) -> dict:
    (doc,) = [d for d in _load_all(KUBERAY / name) if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifests_pass_the_checker(name):
    docs = _load_all(KUBERAY / name)
    assert docs
    for doc in docs:
        assert kuberay_errors(doc) == []


def _rename(doc: dict, path: str, old: str, new: str) -> None:
    node = doc
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    node[new] = node.pop(old)


@pytest.mark.parametrize(
    ("name", "kind", "path", "old", "new"),
    [
        ("raycluster.yaml", "RayCluster", "spec", "workerGroupSpecs", "workerGroupSpec"),
        ("raycluster.yaml", "RayCluster", "spec", "headGroupSpec", "headGroupSpecs"),
        ("raycluster.yaml", "RayCluster", "spec", "enableInTreeAutoscaling",
         "enableInTreeAutoScaling"),
        ("raycluster.yaml", "RayCluster", "spec.workerGroupSpecs.1", "maxReplicas", "maxReplica"),
        ("raycluster.yaml", "RayCluster", "spec.headGroupSpec", "rayStartParams",
         "rayStartParam"),
        ("raycluster.yaml", "RayCluster", "spec.autoscalerOptions", "idleTimeoutSeconds",
         "idleTimeoutSecond"),
        ("rayjob.yaml", "RayJob", "spec", "entrypoint", "entryPoint"),
        ("rayjob.yaml", "RayJob", "spec.rayClusterSpec.workerGroupSpecs.0", "groupName",
         "groupname"),
    ],
)
def test_kuberay_checker_catches_misspelt_keys(name, kind, path, old, new):
    doc = copy.deepcopy(_doc(name, kind))
    _rename(doc, path, old, new)
    errors = kuberay_errors(doc)
    assert any(f".{new}: unknown field" in e for e in errors), errors


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g)
                                                  for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def _cluster_spec_layout(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == _dockerfile_base().split(":")[1].split("-")[0]

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {ENGINE, TRAIN}
    for name, gpus in ((ENGINE, 1), (TRAIN, 8)):
        group = groups[name]
        assert group["minReplicas"] == 0 and group["replicas"] == 0
        assert group["maxReplicas"] >= 1
        assert group["rayStartParams"]["num-gpus"] == str(gpus)
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)

    # Every pod: the bucket's credentials from the palign ServiceAccount (or the optional
    # Secret's keys), the model caches on a volume of the node's own disk (the paths the jobs'
    # runtime env uses), and no shared volume by default.
    account = _doc("serviceaccount.yaml", "ServiceAccount")["metadata"]["name"]
    job_env = _job_env()
    images = set()
    for group_name, container in _containers(spec):
        images.add(container["image"])
        group = spec["headGroupSpec"] if group_name == "head" else groups[group_name]
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == account, group_name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in ("PALIGN_CACHE_DIR", "HF_HOME")} == {
            k: job_env[k] for k in ("PALIGN_CACHE_DIR", "HF_HOME")}, group_name
        secrets = [s["secretRef"] for s in container.get("envFrom", []) if "secretRef" in s]
        assert all(s.get("optional") is True for s in secrets), group_name  # starts without it
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert not any("persistentVolumeClaim" in v for v in volumes.values()), group_name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert SHARED not in mounts, group_name
        (cache_mount,) = [p for p in mounts if env["PALIGN_CACHE_DIR"].startswith(p + "/")]
        assert "emptyDir" in volumes[mounts[cache_mount]], group_name
    (image,) = images
    assert re.search(r"/palign:[\w.-]+$", image)


def test_raycluster_layout():
    _cluster_spec_layout(_doc("raycluster.yaml", "RayCluster")["spec"])


def test_kuberay_shared_volume_is_an_option():
    """pvc.yaml stays, and each pod template says where its volume and mount go (commented)."""
    claim = _doc("pvc.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (KUBERAY / name).read_text()
        assert SHARED not in _active_text(KUBERAY / name), name
        assert text.count(f"claimName: {claim['metadata']['name']}") == 3, name  # 3 pod templates
        assert text.count(f"# - {{name: shared, mountPath: {SHARED}}}") == 3, name


def test_rayjob_layout():
    spec = _doc("rayjob.yaml", "RayJob")["spec"]
    assert spec["entrypoint"].split() == ENTRYPOINT.split()
    assert (ROOT / ENTRYPOINT.split("--config ")[1]).is_file()
    # KubeRay pastes the entrypoint unquoted into the submitter's shell command.
    assert not re.search(r"[;&|<>`$]", spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert {"PALIGN_CACHE_DIR", "HF_HOME"} <= set(runtime_env["env_vars"])
    assert runtime_env["working_dir"] == "/home/ray/palign"  # where cluster/Dockerfile puts it
    # The same environment as `ray job submit --runtime-env ray_jobs/runtime_env.yaml`.
    job_env = ROOT / "ray_jobs" / "runtime_env.yaml"
    if job_env.exists():
        submitted = _load(job_env)
        assert runtime_env["env_vars"] == submitted["env_vars"]
        assert runtime_env.get("excludes") == submitted.get("excludes")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    # The job's cluster is the long-lived one: keep the two specs identical.
    assert spec["rayClusterSpec"] == _doc("raycluster.yaml", "RayCluster")["spec"]
    _cluster_spec_layout(spec["rayClusterSpec"])


# ------------------------------------------------------------------ the cluster run configs


def test_cluster_run_configs_default_to_a_bucket():
    """The cluster configs keep every run's data on one object-store bucket (no shared
    filesystem needed), and the model cache on each node's own disk."""
    from palign.core import storage
    from palign.core.config import load_config

    configs = sorted(CLUSTER_CONFIGS.glob("*.yaml"))
    if not configs:
        pytest.skip("no cluster run configs in this tree")
    buckets = set()
    for path in configs:
        cfg = load_config(path)
        assert storage.scheme(cfg.run.output_dir) in ("s3", "gs"), path.name
        locations = [cfg.run.output_dir, cfg.data.path, cfg.train.storage_path,
                     *[b.path for b in cfg.evaluate.benchmarks]]
        for location in filter(None, locations):
            assert storage.is_uri(location), (path.name, location)
            buckets.add(location.split("/")[2])
        cache = cfg.models.cache_dir
        assert cache and not storage.is_uri(cache) and not cache.startswith(SHARED), path.name
        assert cache == _job_env()["PALIGN_CACHE_DIR"], path.name  # the nodes' cache too
        assert SHARED not in _active_text(path), path.name  # the mount: documented, not used
    assert len(buckets) == 1, buckets  # one placeholder to replace


def _k8s_cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _node_sizes() -> dict[str, dict[str, dict[str, float]]]:
    """{deployment: {ENGINE/TRAIN: {cpus, gpus, max}}} as Ray sees each worker node."""
    sizes = {}
    for name in LAUNCHER_FILES:
        types = _ray_checked(_load(CLUSTER / name))["available_node_types"]
        sizes[name] = {t: {"cpus": types[t]["resources"]["CPU"],
                           "gpus": types[t]["resources"]["GPU"],
                           "max": types[t]["max_workers"]} for t in (ENGINE, TRAIN)}
    groups = {g["groupName"]: g
              for g in _doc("raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]}
    sizes["kuberay"] = {}
    for t in (ENGINE, TRAIN):
        (container,) = groups[t]["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        sizes["kuberay"][t] = {"cpus": _k8s_cpus(str(limits["cpu"])),
                               "gpus": int(limits["nvidia.com/gpu"]),
                               "max": groups[t]["maxReplicas"]}
    return sizes


def test_cluster_run_configs_fit_the_nodes():
    """Every config in configs/arms/cluster fits every deployment: each engine replica on one
    engine node, the train workers on the train nodes and never on an engine node (Ray Train's
    PACK placement group is best effort, so a worker that fits on an idle engine node can land
    there)."""
    configs = sorted((ROOT / "configs" / "arms" / "cluster").glob("*.yaml"))
    if not configs:
        pytest.skip("no cluster run configs in this tree")
    from palign.core.config import load_config
    from palign.runtime.resources import plan_resources

    for deployment, nodes in _node_sizes().items():
        engine, train = nodes[ENGINE], nodes[TRAIN]
        for path in configs:
            where = f"{path.name} on {deployment}"
            plan = plan_resources(load_config(path))
            for request in plan.engines:
                assert request.cpus_per_replica <= engine["cpus"], where
                assert request.gpus_per_replica <= engine["gpus"], where
                assert request.max_replicas <= engine["max"], where
            if plan.train is not None and plan.train.use_gpu:
                worker = plan.train.resources_per_worker
                assert worker["CPU"] > engine["cpus"], where
                assert worker["CPU"] * train["gpus"] <= train["cpus"], where
                assert plan.train.num_workers <= train["gpus"] * train["max"], where


# ------------------------------------------------------------------ image and docs


def test_dockerfile_installs_palign_with_vllm():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-gpu", _dockerfile_base())
    assert re.search(r"^COPY\b.*\s\.\s", text, re.M)  # the repo goes into the image
    assert "pip install" in text and "'vllm'" in text
    assert "-c requirements/gpu.lock" in text  # the locked versions
    # The extra every file installs exists in pyproject.toml.
    extras = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    assert re.search(r"^vllm\s*=", extras.split("\n[")[0], re.M)


def test_readme_covers_every_file():
    readme = (CLUSTER / "README.md").read_text()
    files = [p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*")
             if p.is_file() and p.name != "README.md" and "grafana" not in p.parts]
    assert files
    for rel in files:
        assert f"`{rel}`" in readme, rel
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir ." in readme
