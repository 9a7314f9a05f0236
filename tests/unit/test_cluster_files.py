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

The least-privilege tests read what each identity may do from the files themselves: the IAM
policies of ``aws-iam.yaml`` (a CloudFormation template, plain YAML), the GCP workers' account
and scopes, the token setting of the ``ray start`` commands (run in bash up to ``ray start``),
the pods' securityContext, and which connections ``networkpolicy.yaml`` admits (a small
evaluator of the NetworkPolicy rules these manifests use).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
KUBERAY_FILES = ("raycluster.yaml", "rayjob.yaml", "serviceaccount.yaml", "pvc.yaml",
                 "networkpolicy.yaml")
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
    # credentials for it (what they allow: the least-privilege tests below).
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
# networking.k8s.io/v1 NetworkPolicy: the spec, an ingress rule, a peer, a port.
NETWORK_POLICY_FIELDS = frozenset({"egress", "ingress", "podSelector", "policyTypes"})
INGRESS_RULE_FIELDS = frozenset({"from", "ports"})
PEER_FIELDS = frozenset({"ipBlock", "namespaceSelector", "podSelector"})
PORT_FIELDS = frozenset({"endPort", "port", "protocol"})
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


def _network_policy_errors(spec, errors: list[str]) -> None:
    if not _check_fields(spec, "spec", NETWORK_POLICY_FIELDS, {"podSelector"}, errors):
        return
    if not set(spec.get("policyTypes", [])) <= {"Ingress", "Egress"}:
        errors.append(f"spec.policyTypes: {spec['policyTypes']!r}")
    for i, rule in enumerate(spec.get("ingress") or []):
        where = f"spec.ingress[{i}]"
        if _check_fields(rule, where, INGRESS_RULE_FIELDS, set(), errors):
            for j, peer in enumerate(rule.get("from") or []):
                _check_fields(peer, f"{where}.from[{j}]", PEER_FIELDS, set(), errors)
            for j, port in enumerate(rule.get("ports") or []):
                _check_fields(port, f"{where}.ports[{j}]", PORT_FIELDS, set(), errors)


def kuberay_errors(doc: dict) -> list[str]:
    """The problems with one KubeRay manifest document (empty: none found)."""
    errors: list[str] = []
    kind = doc.get("kind")
    expected_api = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1",
                    "PersistentVolumeClaim": "v1", "ServiceAccount": "v1",
                    "NetworkPolicy": "networking.k8s.io/v1"}
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
            if "submitterPodTemplate" in spec:
                _pod_template_errors(spec["submitterPodTemplate"], "spec.submitterPodTemplate",
                                     errors)
    elif kind == "NetworkPolicy":
        _network_policy_errors(spec, errors)
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

    # Every pod: the bucket's credentials from a ServiceAccount of serviceaccount.yaml (the
    # head's or the workers', test_kuberay_pods_least_privilege) or the optional Secret's keys,
    # the model caches on a volume of the node's own disk (the paths the jobs' runtime env
    # uses), and no shared volume by default.
    accounts = {d["metadata"]["name"] for d in _load_all(KUBERAY / "serviceaccount.yaml")}
    job_env = _job_env()
    images = set()
    for group_name, container in _containers(spec):
        images.add(container["image"])
        group = spec["headGroupSpec"] if group_name == "head" else groups[group_name]
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] in accounts, group_name
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
    assert re.search(r"/palign(:[\w.-]+|@sha256:[0-9a-f]{64})$", image)


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


# ------------------------------------------------------------------ least privilege

HEAD_ACCOUNT, WORKER_ACCOUNT = "palign-head", "palign-worker"  # kuberay/serviceaccount.yaml
# The run bucket in cluster/aws-iam.yaml: the bucket itself and its objects, nothing else.
BUCKET_ARNS = {"arn:aws:s3:::${BucketName}", "arn:aws:s3:::${BucketName}/*"}
GCS_READ_WRITE = "https://www.googleapis.com/auth/devstorage.read_write"


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _iam() -> dict:
    return _load(CLUSTER / "aws-iam.yaml")


def _role_statements(role: dict) -> list[dict]:
    """Every statement of a role's inline policies; a managed policy would escape the checks."""
    props = role["Properties"]
    assert not props.get("ManagedPolicyArns"), props["RoleName"]
    statements = [s for policy in props.get("Policies", [])
                  for s in policy["PolicyDocument"]["Statement"]]
    for s in statements:
        assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s, s
        assert not any("*" in action for action in _as_list(s["Action"])), s  # named actions
    return statements


def _profile_role(iam: dict, profile_name: str) -> dict:
    """The role behind an instance profile of aws-iam.yaml, by the profile's name."""
    resources = iam["Resources"]
    (profile,) = [r for r in resources.values() if r["Type"] == "AWS::IAM::InstanceProfile"
                  and r["Properties"]["InstanceProfileName"] == profile_name]
    (ref,) = profile["Properties"]["Roles"]
    return resources[ref["Ref"]]


def _s3_limited_to_the_bucket(statements: list[dict]) -> None:
    for s in statements:
        if any(a.startswith("s3:") for a in _as_list(s["Action"])):
            assert all(a.startswith("s3:") for a in _as_list(s["Action"])), s
            assert {r["Fn::Sub"] for r in _as_list(s["Resource"])} <= BUCKET_ARNS, s


def _aws_profiles(cfg: dict) -> tuple[str, set[str]]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {types[t]["node_config"]["IamInstanceProfile"]["Name"] for t in (ENGINE, TRAIN)}
    return head, workers


def test_aws_workers_reach_only_the_run_bucket():
    """The worker node types run as their own instance profile, whose role may list, read,
    write and delete the objects of the one bucket the user names, and nothing else."""
    cfg = _ray_checked(_load(CLUSTER / "aws.yaml"))
    iam = _iam()
    head, workers = _aws_profiles(cfg)
    (worker,) = workers
    assert worker != head
    statements = _role_statements(_profile_role(iam, worker))
    assert statements
    assert all(a.startswith("s3:") for s in statements for a in _as_list(s["Action"]))
    _s3_limited_to_the_bucket(statements)
    actions = {a for s in statements for a in _as_list(s["Action"])}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    # The bucket is the user's to set: no default, a bucket name (not a URI, not a path).
    bucket = iam["Parameters"]["BucketName"]
    assert "Default" not in bucket
    assert re.fullmatch(bucket["AllowedPattern"], "my-bucket")
    assert not re.fullmatch(bucket["AllowedPattern"], "s3://my-bucket/palign")


def test_aws_head_keeps_only_what_the_autoscaler_needs():
    """The head's role: the bucket (the driver), launching and tagging instances in the
    cluster's region, terminating only this cluster's (by the tag Ray puts on them), resolving
    the AMI parameter, and passing the workers' role and no other."""
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    cfg = _ray_checked(_load(CLUSTER / "aws.yaml"))
    iam = _iam()
    head, _ = _aws_profiles(cfg)
    statements = _role_statements(_profile_role(iam, head))
    _s3_limited_to_the_bucket(statements)
    by_action: dict[str, list[dict]] = {}
    for s in statements:
        for action in _as_list(s["Action"]):
            by_action.setdefault(action, []).append(s)
    autoscaler = {"ec2:DescribeInstances", "ec2:RunInstances", "ec2:CreateTags",
                  "ec2:TerminateInstances", "iam:PassRole", "ssm:GetParameters"}
    assert {a for a in by_action if not a.startswith("s3:")} == autoscaler
    assert "ssm" in cfg["available_node_types"][ENGINE]["node_config"]["ImageId"]
    # Only the worker role may be passed, and only to EC2.
    (pass_role,) = by_action["iam:PassRole"]
    assert _as_list(pass_role["Resource"]) == [{"Fn::GetAtt": ["WorkerRole", "Arn"]}]
    assert pass_role["Condition"]["StringEquals"]["iam:PassedToService"] == "ec2.amazonaws.com"
    # Terminating (and retagging an existing instance) only for this cluster's instances.
    (terminate,) = by_action["ec2:TerminateInstances"]
    tag = terminate["Condition"]["StringEquals"][f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}"]
    assert iam["Parameters"][tag["Ref"]]["Default"] == cfg["cluster_name"]
    for s in by_action["ec2:CreateTags"]:
        assert s is terminate or s["Condition"]["StringEquals"]["ec2:CreateAction"] == \
            "RunInstances", s
    (run,) = by_action["ec2:RunInstances"]
    assert run["Condition"]["StringEquals"]["aws:RequestedRegion"] == {"Ref": "AWS::Region"}
    (ssm,) = by_action["ssm:GetParameters"]
    assert all("parameter/aws/service/deeplearning/" in r["Fn::Sub"]
               for r in _as_list(ssm["Resource"]))


def test_aws_nodes_require_imdsv2():
    """Every node type asks for IMDSv2 only; one hop is enough because Ray runs its containers
    on the host's network."""
    from ray.autoscaler._private.docker import docker_start_cmds

    cfg = _ray_checked(_load(CLUSTER / "aws.yaml"))
    for node_type, spec in cfg["available_node_types"].items():
        assert spec["node_config"]["MetadataOptions"] == {
            "HttpTokens": "required", "HttpEndpoint": "enabled",
            "HttpPutResponseHopLimit": 1}, node_type
    docker = cfg["docker"]
    run = docker_start_cmds("ubuntu", docker["image"], {}, docker["container_name"],
                            docker["run_options"], cfg["cluster_name"], "/home/ray", "docker")
    assert "--net=host" in run.split()


def test_gcp_workers_reach_only_storage():
    """The GCP workers run as an account of their own whose token is scoped to Cloud Storage
    alone, granted roles on the run bucket only; the head keeps Ray's account."""
    path = CLUSTER / "gcp.yaml"
    cfg = _ray_checked(_load(path))
    types = cfg["available_node_types"]
    assert "serviceAccounts" not in types[cfg["head_node_type"]]["node_config"]
    accounts = set()
    for node_type in (ENGINE, TRAIN):
        (account,) = types[node_type]["node_config"]["serviceAccounts"]
        assert account["scopes"] == [GCS_READ_WRITE], node_type
        accounts.add(account["email"])
    (email,) = accounts
    # Not the account Ray makes for the head (ray.autoscaler._private.gcp.config's
    # DEFAULT_SERVICE_ACCOUNT_ID; that module needs Google's client libraries to import).
    assert email.split("@")[0] not in ("ray-autoscaler-sa-v1", "default")
    assert email.endswith("@YOUR-PROJECT-ID.iam.gserviceaccount.com")
    # The roles go on the bucket, never on the project.
    header = path.read_text().split("\ncluster_name:")[0]
    assert "gcloud storage buckets add-iam-policy-binding gs://YOUR-BUCKET" in header
    assert f"serviceAccount:{email}" in header
    assert "projects add-iam-policy-binding" not in header


def _token_mount(cfg: dict) -> str:
    (remote,) = [r for r, local in cfg["file_mounts"].items() if local == "~/.ray/auth_token"]
    return remote


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_starts_ray_only_with_token_auth(name, key, tmp_path):
    """The command that starts Ray sets token authentication itself (nothing sourced from a
    shell file), reading the token the launcher copies to the node, and refuses to start Ray
    when that token is missing. The command runs in bash up to the `ray start`, which prints
    the environment Ray would get instead."""
    import os
    import subprocess

    cfg = _ray_checked(_load(CLUSTER / name))
    (start,) = [c for c in cfg[key] if "ray start" in c]
    probe = start.replace("ray start", 'printf "%s|%s\\n" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN_PATH";'
                          " : ", 1)
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}  # no RAY_AUTH_* of ours

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True,
                              timeout=30)

    refused = run()  # no token on the node yet
    assert refused.returncode != 0 and "token" not in refused.stdout, refused
    assert "auth token" in refused.stderr
    token = tmp_path / _token_mount(cfg).removeprefix("~/")
    token.write_text("0123456789abcdef")
    started = run()
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == f"token|{token}"


def _locked_down(pod: dict, where: str) -> int:
    """A pod that cannot run as root or gain privileges; returns its user id."""
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True, where
    assert sc["runAsUser"] > 0, where
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
    for container in pod["containers"] + pod.get("initContainers", []):
        _container_locked_down(container["securityContext"], f"{where}: {container['name']}")
    return sc["runAsUser"]


def _container_locked_down(sc: dict, where: str) -> None:
    assert sc["allowPrivilegeEscalation"] is False, where
    assert sc["capabilities"] == {"drop": ["ALL"]}, where  # none added back
    assert sc.get("privileged") is not True and sc.get("runAsUser", 1) != 0, where


def _ray_pods(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod template) of a cluster spec: the head, then each worker group."""
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]


def test_kuberay_pods_least_privilege():
    """Every pod (head, workers, the RayJob's submitter, the autoscaler sidecar) runs as the
    image's non-root user with no privilege escalation and no capabilities; only the head's
    account may use the Kubernetes API; the image's own user is that non-root id."""
    accounts = {d["metadata"]["name"]: d for d in _load_all(KUBERAY / "serviceaccount.yaml")}
    assert set(accounts) == {HEAD_ACCOUNT, WORKER_ACCOUNT}
    assert accounts[WORKER_ACCOUNT]["automountServiceAccountToken"] is False
    assert accounts[HEAD_ACCOUNT].get("automountServiceAccountToken", True) is True  # autoscaler
    job = _doc("rayjob.yaml", "RayJob")["spec"]
    users = set()
    for where, spec in (("raycluster.yaml", _doc("raycluster.yaml", "RayCluster")["spec"]),
                        ("rayjob.yaml", job["rayClusterSpec"])):
        _container_locked_down(spec["autoscalerOptions"]["securityContext"], f"{where} autoscaler")
        for group, template in _ray_pods(spec):
            pod = template["spec"]
            users.add(_locked_down(pod, f"{where} {group}"))
            if group == "head":
                assert pod["serviceAccountName"] == HEAD_ACCOUNT
                assert pod.get("automountServiceAccountToken", True) is True
            else:
                assert pod["serviceAccountName"] == WORKER_ACCOUNT, group
                assert pod["automountServiceAccountToken"] is False, group
    submitter = job["submitterPodTemplate"]["spec"]
    users.add(_locked_down(submitter, "rayjob.yaml submitter"))
    assert submitter["automountServiceAccountToken"] is False
    assert job["submissionMode"] == "K8sJobMode"  # the mode that uses submitterPodTemplate
    (user,) = users
    dockerfile_users = re.findall(r"^USER\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert dockerfile_users and dockerfile_users[-1].split(":")[0] == str(user)


# NetworkPolicy semantics, the parts these manifests use: a policy isolates the pods its
# podSelector matches (matchLabels) for the directions of its policyTypes; an isolated pod
# accepts a connection only if some rule of a policy selecting it matches the source (a
# podSelector: same namespace; a namespaceSelector: any pod of the matching namespaces; both:
# both) and the port (no ports: every port).
NAMESPACE = {"kubernetes.io/metadata.name": "palign"}


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what this evaluator understands
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, source: dict) -> bool:
    assert "ipBlock" not in peer, peer
    if "namespaceSelector" in peer:
        return _selects(peer["namespaceSelector"], source["namespace"]) and _selects(
            peer.get("podSelector", {}), source["labels"])
    return source["namespace"] == NAMESPACE and _selects(peer["podSelector"], source["labels"])


def _admits(policies: list[dict], target: dict, source: dict, port: int) -> bool:
    """Whether a TCP connection from source to target's port gets through (both pods are
    {"labels", "namespace"}; the target is in palign's namespace, where the policies are)."""
    isolating = [p["spec"] for p in policies if "Ingress" in p["spec"].get("policyTypes", [])
                 and _selects(p["spec"]["podSelector"], target["labels"])]
    if not isolating:
        return True
    for spec in isolating:
        for rule in spec.get("ingress") or []:
            peers = rule.get("from") or []
            ports = rule.get("ports") or []
            if (not peers or any(_peer_matches(p, source) for p in peers)) and (
                    not ports or any(p.get("protocol", "TCP") == "TCP" and p["port"] == port
                                     for p in ports)):
                return True
    return False


def _pod(template_labels: dict, **kuberay_labels: str) -> dict:
    """A pod of palign's namespace: KubeRay's labels, then the template's (which override)."""
    return {"labels": {**kuberay_labels, **template_labels}, "namespace": NAMESPACE}


def test_kuberay_network_policy_admits_only_ray_pods():
    """Only palign's Ray pods reach one another; the head's dashboard port is also open to the
    RayJob's submitter and the KubeRay operator; nothing else in the cluster gets in."""
    policies = _load_all(KUBERAY / "networkpolicy.yaml")
    assert {p["kind"] for p in policies} == {"NetworkPolicy"}
    job = _doc("rayjob.yaml", "RayJob")["spec"]
    pods = {}
    for where, spec in (("raycluster.yaml", _doc("raycluster.yaml", "RayCluster")["spec"]),
                        ("rayjob.yaml", job["rayClusterSpec"])):
        for group, template in _ray_pods(spec):
            node_type = "head" if group == "head" else "worker"
            pods[f"{where} {group}"] = _pod(template["metadata"]["labels"],
                                            **{"ray.io/node-type": node_type,
                                               "ray.io/cluster": "palign", "ray.io/group": group,
                                               "app.kubernetes.io/name": "kuberay",
                                               "app.kubernetes.io/created-by": "kuberay-operator"})
    submitter = _pod(job["submitterPodTemplate"]["metadata"]["labels"],
                     **{"ray.io/originated-from-crd": "RayJob",
                        "ray.io/originated-from-cr-name": "palign-pipeline"})
    operator = {"labels": {"app.kubernetes.io/name": "kuberay-operator"},
                "namespace": {"kubernetes.io/metadata.name": "kuberay-system"}}
    stranger = _pod({"app": "notebook"})  # any other pod, even in palign's namespace
    outsider = {"labels": {"app": "notebook"},
                "namespace": {"kubernetes.io/metadata.name": "other"}}
    dashboard, gcs, worker_port = 8265, 6379, 10002

    heads = [p for name, p in pods.items() if name.endswith(" head")]
    workers = [p for name, p in pods.items() if not name.endswith(" head")]
    assert len(heads) == 2 and len(workers) == 4
    for ray_pod in heads + workers:
        for other in heads + workers:
            assert _admits(policies, ray_pod, other, gcs)
            assert _admits(policies, ray_pod, other, worker_port)
        for source in (stranger, outsider, submitter, operator):
            assert not _admits(policies, ray_pod, source, gcs)
            assert not _admits(policies, ray_pod, source, worker_port)
        assert not _admits(policies, ray_pod, stranger, dashboard)
        assert not _admits(policies, ray_pod, outsider, dashboard)
    for head in heads:
        assert _admits(policies, head, submitter, dashboard)
        assert _admits(policies, head, operator, dashboard)
    for worker in workers:
        assert not _admits(policies, worker, submitter, dashboard)
        assert not _admits(policies, worker, operator, dashboard)
    for source in (stranger, outsider, operator, *heads, *workers):
        assert not _admits(policies, submitter, source, dashboard)


def _pinned(image: str) -> bool:
    """An image named by digest, or by a tag that carries an exact x.y.z version."""
    name, _, digest = image.partition("@")
    if digest:
        return re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    return "latest" not in tag and re.search(r"(?<![\d.])\d+\.\d+\.\d+(?![\d.])", tag) is not None


def test_images_are_pinned():
    """Every container image these files run: an exact version or a digest, never a moving
    tag."""
    for floating in ("rayproject/ray", "rayproject/ray:latest-gpu", "rayproject/ray:2.60-gpu",
                     "rayproject/ray:nightly-py312-gpu", "registry.example.com:5000/palign",
                     "palign:1.2.3.4", "palign@sha256:abc"):
        assert not _pinned(floating), floating
    images = {_dockerfile_base()}
    for name in LAUNCHER_FILES:
        images.add(_load(CLUSTER / name)["docker"]["image"])
    job = _doc("rayjob.yaml", "RayJob")["spec"]
    templates = [t for s in (_doc("raycluster.yaml", "RayCluster")["spec"], job["rayClusterSpec"])
                 for _, t in _ray_pods(s)] + [job["submitterPodTemplate"]]
    for spec in (_doc("raycluster.yaml", "RayCluster")["spec"], job["rayClusterSpec"]):
        images |= {spec["autoscalerOptions"]["image"]} if "image" in spec[
            "autoscalerOptions"] else set()
    for template in templates:
        pod = template["spec"]
        images |= {c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
    assert len(images) == 2, images  # Ray's image, and palign's built from it
    for image in images:
        assert _pinned(image), image


# ------------------------------------------------------------------ the cluster run configs


def test_cluster_run_configs_default_to_a_bucket():
    """The cluster configs keep every run's data on one object-store bucket (no shared
    filesystem needed), and the model cache on each node's own disk."""
    from palign.config import load_config
    from palign.data import storage

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
    from palign.config import load_config
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
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-gpu(@sha256:[0-9a-f]{64})?",
                        _dockerfile_base())
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
