"""The cluster files are checked the way the cluster would check them, without a cluster, against
the one KubeRay release this project supports (cluster/kuberay/KUBERAY_VERSION).

- The release's files are vendored in tests/schemas/kuberay/<version>/ (CRDs, the operator chart's
  values.yaml, its feature-gate names; provenance in the README there), and every mention of a
  KubeRay version in the docs and manifests is that version.
- operator-values.yaml names only gates of that release, and differs from the chart's values only
  where its comment says so.
- Every manifest in cluster/kuberay validates against its CRD's openAPIV3Schema, made strict the
  way `kubectl apply` (server-side field validation) is: unknown fields are errors, and the CRD's
  CEL rules (x-kubernetes-validations) are evaluated. Then the CRD's defaults are applied, as the
  API server does, and the KubeRay operator's own rules are checked: a mirror of that release's
  validation.go (and of robfig/cron v3's ParseStandard for the schedule). A copy of a manifest
  with one mistake must be refused by the named rule, so none of these checks is vacuous.
- Pods: no /dev/shm of our own (KubeRay sizes its own from the memory limit), ephemeral storage
  for spilling; RayJobs bring their own cluster, which a deadline or failure deletes at once, and
  are deleted themselves after a week.
- The Dockerfile pins torch to the base image's CUDA and checks it; dependencies before code.
- cluster/launcher/aws-gpu.yaml validates against Ray's ray-schema.json and Ray's own `ray up`
  checks, and needs an AMI and instance profiles (render.sh refuses it without them).
- Every entry point named in a manifest is an absolute path inside the image, runs from another
  working directory, accepts the flags the manifest passes (`--help`), and its KEY=VALUE
  overrides build a valid config; the nightly job's dry run lists the dates it would tag.

No Ray cluster is started here; the test takes a few seconds (the `--help` runs import torch).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zoneinfo
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY_VERSION = (CLUSTER / "kuberay" / "KUBERAY_VERSION").read_text().strip()
RELEASE = Path(__file__).resolve().parent / "schemas" / "kuberay" / KUBERAY_VERSION
RELEASE_COMMIT = "59d663aeec13760646da3db9c1cf8cfe883e30b7"  # ray-project/kuberay tag v1.7.0
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}  # fmt: skip
VALUES = CLUSTER / "kuberay" / "operator-values.yaml"  # Helm values for the operator, not a ray.io resource
MANIFESTS = sorted(p for p in (CLUSTER / "kuberay").glob("*.yaml") if p != VALUES)
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
# Stand-ins for the launcher's required AWS names (no defaults in storage.env).
AWS_VALUES = {"EMOTIONS_AWS_AMI": "ami-0123456789abcdef0",
              "EMOTIONS_AWS_HEAD_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/head",
              "EMOTIONS_AWS_WORKER_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/worker"}  # fmt: skip


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# ----------------------------------------------------------------------------- the release


def test_one_kuberay_release_is_vendored_and_named_everywhere():
    vendored = sorted(p.name for p in RELEASE.parent.iterdir() if p.is_dir())
    assert vendored == [KUBERAY_VERSION], f"vendor exactly the release in KUBERAY_VERSION, found {vendored}"
    assert sorted(p.name for p in RELEASE.iterdir()) == sorted(
        [*CRD_FILES.values(), "values.yaml", "feature-gates.txt", "README.md"])  # fmt: skip
    assert RELEASE_COMMIT in (RELEASE / "README.md").read_text()
    assert load_yaml(RELEASE / "values.yaml")["image"]["tag"] == f"v{KUBERAY_VERSION}"
    for path in [ROOT / "docs" / "cluster.md", ROOT / "README.md", VALUES, *MANIFESTS]:
        text = path.read_text()
        named = set(re.findall(r"kuberay-operator --version (\S+)", text))
        named |= set(re.findall(r"KubeRay (?:v|release |version )?(\d+\.\d+(?:\.\d+)?)", text))
        assert named <= {KUBERAY_VERSION}, f"{path.relative_to(ROOT)} names KubeRay {sorted(named)}"
    assert f"--version {KUBERAY_VERSION}" in (ROOT / "docs" / "cluster.md").read_text()


def gate_names() -> list[str]:
    return (RELEASE / "feature-gates.txt").read_text().split()


def helm_values() -> dict:
    """The values the operator is installed with: Helm merges maps and replaces lists."""

    def merge(base, override):
        if isinstance(base, dict) and isinstance(override, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in override.items()}}
        return override

    return merge(load_yaml(RELEASE / "values.yaml"), load_yaml(VALUES))


def gates() -> dict[str, bool]:
    """Gates the operator runs with. Those the chart does not list keep the operator's default,
    which for every unlisted 1.7.0 gate (SidecarSubmitterRestart, GCSFaultToleranceEmbeddedStorage,
    KubernetesWAS: alpha) is off."""
    return {g["name"]: bool(g["enabled"]) for g in helm_values()["featureGates"]}


def value_changes(chart, merged, path: str = "") -> set[tuple[str, object]]:
    """(path, new value) for every leaf ``merged`` changes; featureGates compared by name."""
    if isinstance(chart, dict) and isinstance(merged, dict):
        out = set()
        for key in chart.keys() | merged.keys():
            sub = f"{path}.{key}" if path else key
            if key == "featureGates":
                before = {g["name"]: g["enabled"] for g in chart.get(key) or []}
                after = {g["name"]: g["enabled"] for g in merged.get(key) or []}
                out |= {(f"featureGates[{n}].enabled", after.get(n, "removed")) for n in before | after
                        if before.get(n, "absent") != after.get(n, "removed")}  # fmt: skip
            else:
                out |= value_changes(chart.get(key), merged.get(key), sub)
        return out
    return set() if chart == merged else {(path, json.dumps(merged))}


def test_operator_values_use_only_the_release_gates_and_differ_from_the_chart_only_as_declared():
    listed = [g["name"] for g in load_yaml(VALUES)["featureGates"]]
    unknown = sorted(set(listed) - set(gate_names()))
    assert not unknown, f"KubeRay {KUBERAY_VERSION}'s operator exits on unrecognized feature gates {unknown}"
    assert len(listed) == len(set(listed))
    declared = {(path, yaml.safe_load(value)) for path, value in
                re.findall(r"^# change: (\S+) = (.+)$", VALUES.read_text(), re.M)}  # fmt: skip
    actual = value_changes(load_yaml(RELEASE / "values.yaml"), helm_values())
    assert actual == declared, f"operator-values.yaml changes {sorted(actual)}, its comment declares {sorted(declared)}"
    assert gates()["RayCronJob"], "raycronjob-tag-nightly.yaml needs the RayCronJob gate"


# ----------------------------------------------------------------------------- storage.env


@functools.cache
def storage_values(**overrides: str) -> dict[str, str]:
    """cluster/storage.env as bash reads it, with its defaults (EMOTIONS_* cleared from the env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")} | overrides
    out = subprocess.run(["bash", "-c", f"set -a; . {shlex.quote(str(CLUSTER / 'storage.env'))}; env -0"],
                         env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("EMOTIONS_")}


def render(text: str, **overrides: str) -> str:
    """What cluster/render.sh prints: ${NAME} replaced for the names storage.env defines."""
    values = storage_values(**AWS_VALUES, **overrides)
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def rendered(path: Path) -> dict:
    return yaml.safe_load(render(path.read_text()))


def test_every_placeholder_is_defined_in_storage_env():
    values = storage_values()
    assert {"EMOTIONS_IMAGE", "EMOTIONS_RUNS", "EMOTIONS_BUNDLES", "EMOTIONS_DUMPS", "EMOTIONS_TAGGED",
            *AWS_VALUES} <= set(values)  # fmt: skip
    assert {k for k, v in values.items() if not v} == set(AWS_VALUES), "only the AWS names are required"
    for path in [*MANIFESTS, LAUNCHER]:
        unknown = set(PLACEHOLDER.findall(path.read_text())) - set(values) - {"RAY_HEAD_IP"}
        assert not unknown, f"{path.relative_to(ROOT)} uses {sorted(unknown)}, not defined in cluster/storage.env"
        assert not re.search(r"\$\{EMOTIONS_\w+\}", render(path.read_text()))


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext-base) is not installed")
def test_render_script_fills_exactly_the_storage_names_and_refuses_what_is_missing():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}

    def run(path: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER / "render.sh"), str(path)], capture_output=True, text=True,
                              env=clean | env)  # fmt: skip

    for path in [*MANIFESTS, LAUNCHER]:
        out = run(path, **AWS_VALUES)
        assert out.returncode == 0, out.stderr
        assert out.stdout == render(path.read_text()), f"render.sh and the test disagree on {path.name}"
    assert "$RAY_HEAD_IP" in render(LAUNCHER.read_text())  # other `$` pass through untouched
    assert run(MANIFESTS[0]).returncode == 0  # a KubeRay manifest needs none of the AWS names
    for name in AWS_VALUES:
        out = run(LAUNCHER, **{k: v for k, v in AWS_VALUES.items() if k != name})
        assert out.returncode == 2 and f"{name} is empty" in out.stderr, out.stderr
    out = run(LAUNCHER, **(AWS_VALUES | {"EMOTIONS_AWS_AMI": "ubuntu-22.04"}))
    assert out.returncode == 2 and "EMOTIONS_AWS_AMI=ubuntu-22.04 does not look like" in out.stderr


# ----------------------------------------------------------------------------- CRD schemas

# Every CEL rule (x-kubernetes-validations) in the release's CRDs, as the API server evaluates it
# on create. `self == oldSelf` rules are transition rules: they apply to updates only.
CEL_RULES = {
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not (("onSuccess" in s or "onFailure" in s) and "deletionRules" in s),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: ("onSuccess" in s and "onFailure" in s) or "deletionRules" in s,
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not ("jobStatus" in s and "jobDeploymentStatus" in s),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": lambda s: "jobStatus" in s or "jobDeploymentStatus" in s,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "self == oldSelf": lambda s: True,
}  # fmt: skip


def cel_rules(validator, rules, instance, schema):
    for rule in rules:
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield jsonschema.ValidationError(f"CEL rule not mirrored in CEL_RULES: {rule['rule']}")
        elif not check(instance):
            yield jsonschema.ValidationError(rule.get("message", rule["rule"]))


StrictValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-validations": cel_rules})


def strict(schema: dict) -> dict:
    """An openAPIV3Schema as a JSON Schema that refuses what the API server refuses.

    - Objects with ``properties`` get ``additionalProperties: false``: kubectl's strict field
      validation rejects unknown fields (a typo like ``enableInTreeAutoScaling`` fails here).
    - ``nullable: true`` becomes ``type: [T, "null"]``.
    - ``x-kubernetes-int-or-string`` fields already carry ``anyOf: [integer, string]`` plus a quantity
      ``pattern`` that applies to strings only, so ``cpu: 1``, ``cpu: "500m"`` and ``memory: 8Gi``
      pass and ``memory: 8GB`` or ``cpu: 0.5`` do not, as with the API server.
    - ``x-kubernetes-validations`` (CEL) are evaluated by ``cel_rules``; other ``x-kubernetes-*``
      keys and ``format`` are annotations jsonschema ignores.
    """
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {name: strict(sub) for name, sub in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(sub) for sub in s[key]]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


@functools.cache
def crd_schema(kind: str, api_version: str) -> dict:
    assert kind in CRD_FILES, f"no CRD for kind {kind!r}; known: {sorted(CRD_FILES)}"
    crd = load_yaml(RELEASE / CRD_FILES[kind])
    group, _, version = api_version.partition("/")
    assert group == crd["spec"]["group"], f"{kind}: apiVersion group {group!r} is not {crd['spec']['group']!r}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind}: version {version!r} is not served; served: {sorted(served)}"
    return served[version]["schema"]["openAPIV3Schema"]


@functools.cache
def crd_validator(kind: str, api_version: str):
    return StrictValidator(strict(crd_schema(kind, api_version)))


def schema_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc.get("kind"), doc.get("apiVersion", ""))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]  # fmt: skip


def with_defaults(doc, schema: dict):
    """``doc`` with the schema's defaults filled in, as the API server stores it."""
    if isinstance(doc, dict):
        out = dict(doc)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = with_defaults(out[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            out = {k: with_defaults(v, schema["additionalProperties"]) if k not in schema.get("properties", {})
                   else v for k, v in out.items()}  # fmt: skip
        return out
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(item, schema["items"]) for item in doc]
    return doc


def test_cel_table_covers_every_rule_of_the_release():
    def rules(node):
        if isinstance(node, dict):
            yield from (r["rule"] for r in node.get("x-kubernetes-validations", []))
            for value in node.values():
                yield from rules(value)
        elif isinstance(node, list):
            for value in node:
                yield from rules(value)

    found = {rule for kind in CRD_FILES for rule in rules(crd_schema(kind, "ray.io/v1"))}
    assert found == set(CEL_RULES), f"CEL rules of KubeRay {KUBERAY_VERSION} not mirrored: {found - set(CEL_RULES)}"


# ----------------------------------------------------------------------------- operator rules
# A mirror of ray-operator/controllers/ray/utils/validation.go at the vendored release, in its
# order: each function returns upstream's first error, or None. Parts of upstream that these
# manifests do not touch and that are not mirrored (GCS fault tolerance options, network policy,
# TLS, history server collector) make the check fail until they are mirrored.

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
MAX_RAYCLUSTER_NAME = 53  # utils/constant.go: MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # MaxRayJobNameLength
MAX_RAYCRONJOB_NAME = MAX_RAYJOB_NAME - 11  # MaxRayCronJobNameLength: room for "-<minutes since 1970>"
NOT_MIRRORED = ("gcsFaultToleranceOptions", "networkPolicy", "tlsOptions", "historyServerOptions")


def name_errors(kind: str, name: str) -> str | None:
    """The API server (names of custom resources are DNS-1123 subdomains), then the operator."""
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return f"metadata.name {name!r} is not a DNS-1123 subdomain (the API server refuses it)"
    limit = {"RayCluster": MAX_RAYCLUSTER_NAME, "RayJob": MAX_RAYJOB_NAME, "RayCronJob": MAX_RAYCRONJOB_NAME}[kind]
    if len(name) > limit:
        return f"{kind} name should be no more than {limit} characters"
    if kind != "RayCronJob" and (len(name) > 63 or not DNS1035.match(name)):
        return f"{kind} name should be a valid DNS1035 label"
    return None


def env_value(container: dict, name: str) -> str | None:
    return next((e.get("value", "") for e in container.get("env", []) if e["name"] == name), None)


def qualified_name_errors(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    bad_prefix = bool(prefix) and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))
    return bad_prefix or not name or len(name) > 63 or not QUALIFIED_NAME.match(name)


def group_errors(name: str, group: dict) -> str | None:
    """validateRayGroupResources and validateRayGroupLabels."""
    params, resources = group.get("rayStartParams", {}), group.get("resources", {})
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and resources:
        return f"resource fields should not be set in both rayStartParams and Resources for {name} group"
    if "labels" in params:
        return f"rayStartParams['labels'] is not supported for {name} group"
    for key, value in group.get("labels", {}).items():
        if qualified_name_errors(key) or (value and (len(value) > 63 or not QUALIFIED_NAME.match(value))):
            return f"invalid label {key}={value} for {name} group"
    return None


def version_below(version: str, minimum: str) -> bool:
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    return parts < [int(p) for p in minimum.split(".")]


def cluster_spec_error(spec: dict, gates: dict[str, bool], annotations: dict | None = None) -> str | None:
    """ValidateRayClusterSpec."""
    annotations = annotations or {}
    used = [key for key in NOT_MIRRORED if spec.get(key)]
    assert not used, f"the operator's checks of {used} are not mirrored here; mirror them before using them"
    head = spec["headGroupSpec"]
    head_containers = head["template"].get("spec", {}).get("containers") or []
    if not head_containers:
        return "headGroupSpec should have at least one container"
    if error := group_errors("Head", head):
        return error
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    options = spec.get("autoscalerOptions") or {}
    v2 = options.get("version") == "v2"
    head_v2_env = env_value(head_containers[0], "RAY_enable_autoscaler_v2") in ("1", "true")
    for group in spec.get("workerGroupSpecs", []):
        name, low, high = group["groupName"], group.get("minReplicas"), group.get("maxReplicas")
        if not group["template"].get("spec", {}).get("containers"):
            return "workerGroupSpec should have at least one container"
        if not autoscaling and (low is None or high is None):
            return f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if low is not None and low < 0:
            return f"worker group {name} has negative minReplicas {low}"
        if high is not None and high < 0:
            return f"worker group {name} has negative maxReplicas {high}"
        if low is not None and high is not None and low > high:
            return f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
        if error := group_errors(name, group):
            return error
        if group.get("idleTimeoutSeconds") is not None:
            if group["idleTimeoutSeconds"] < 0:
                return f"worker group {name}: idleTimeoutSeconds must be non-negative"
            if not (v2 or head_v2_env):
                return f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled"
        if group.get("priority"):
            if not spec.get("rayVersion") or version_below(spec["rayVersion"], "2.56.0"):
                return f"worker group {name}: priority needs Ray 2.56.0 or later"
            if not (v2 or head_v2_env):
                return f"worker group {name}: priority is set, but autoscaler v2 is not enabled"
    if env_value(head_containers[0], "RAY_REDIS_ADDRESS") is not None and \
            annotations.get("ray.io/ft-enabled", "").lower() != "true":  # fmt: skip
        return "RAY_REDIS_ADDRESS is set, which implicitly enables GCS fault tolerance, but it is not set up"
    if head.get("rayStartParams", {}).get("redis-username") or env_value(head_containers[0], "REDIS_USERNAME"):
        return "cannot set redis username in rayStartParams or environment variables"
    suspended = [g["groupName"] for g in spec.get("workerGroupSpecs", []) if g.get("suspend")]
    if suspended and not gates.get("RayJobDeletionPolicy"):
        return f"worker group {suspended[0]} can be suspended only when the RayJobDeletionPolicy gate is on"
    if not autoscaling and head_v2_env:
        return "RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false"
    if autoscaling:
        if suspended:
            return f"worker group {suspended[0]} cannot be suspended with Autoscaler enabled"
        if options.get("version") and env_value(head_containers[0], "RAY_enable_autoscaler_v2") is not None:
            return "both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set"
        if v2:
            pods = [head, *spec.get("workerGroupSpecs", [])]
            if any(p["template"].get("spec", {}).get("restartPolicy", "Never") != "Never" for p in pods):
                return "restartPolicy should be Never or unset when using autoscaler V2"
    if options.get("idleTimeoutSeconds") is not None and options["idleTimeoutSeconds"] < 0:
        return "autoscalerOptions.idleTimeoutSeconds must be non-negative"
    if any(e["name"] == "KUBERAY_GEN_AUTOSCALER_START_CMD" for e in options.get("env", [])):
        return "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD"
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        if not spec.get("rayVersion") or version_below(spec["rayVersion"], "2.52.0"):
            return "authOptions.mode is 'token' but Ray 2.52.0 or later is required"
        if auth.get("enableK8sTokenAuth"):
            if version_below(spec["rayVersion"], "2.55.0"):
                return "authOptions.enableK8sTokenAuth needs Ray 2.55.0 or later"
            if auth.get("secretName"):
                return "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set"
    elif auth.get("enableK8sTokenAuth"):
        return "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
    return None


def upgrade_strategy_error(spec: dict, created_by_rayjob: bool) -> str | None:
    """ValidateRayClusterUpgradeOptions (the RayCluster controller, also for a RayJob's cluster)."""
    kind = (spec.get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in ("Recreate", "None"):
        return f"Spec.UpgradeStrategy.Type value {kind} is invalid"
    if kind is not None and created_by_rayjob:
        return "upgradeStrategy cannot be set when RayCluster is created by RayJob"
    return None


def deletion_error(spec: dict, gates: dict[str, bool]) -> str | None:
    """validateDeletionConfiguration, validateLegacyDeletionPolicies and validateDeletionRules."""
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
    if not shutdown and ttl > 0:
        return "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return None
    if not gates.get("RayJobDeletionPolicy"):
        return "RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy"
    selector = bool(spec.get("clusterSelector"))
    autoscaling = bool((spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling"))
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = strategy.get("deletionRules") or []
    if rules and shutdown:
        return "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"
    if rules and legacy:
        return "Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"
    if legacy:
        on_success, on_failure = strategy.get("onSuccess"), strategy.get("onFailure")
        if on_success is None or on_failure is None:
            return "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set"
        if on_success.get("policy") is None or on_failure.get("policy") is None:
            return "the DeletionPolicyType field of DeletionStrategy.OnSuccess/OnFailure cannot be unset"
        policies = (on_success["policy"], on_failure["policy"])
        if selector and any(p in ("DeleteCluster", "DeleteWorkers") for p in policies):
            return "the ClusterSelector mode doesn't support DeletionStrategy=DeleteCluster/DeleteWorkers"
        if "DeleteWorkers" in policies and autoscaling:
            return "DeletionStrategy=DeleteWorkers currently does not support autoscaling"
        if shutdown and "DeleteNone" in policies:
            return "shutdownAfterJobFinishes is set to 'true' while deletion policy is 'DeleteNone'"
        return None
    if not rules:
        return "DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field"
    errors, ttls = [], {}  # upstream joins every rule's error
    for i, rule in enumerate(rules):
        condition = rule["condition"]
        if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
            errors.append(f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set")
            continue
        if condition.get("ttlSeconds", 0) < 0:
            errors.append(f"deletionRules[{i}]: TTLSeconds must be non-negative")
            continue
        if selector and rule["policy"] in ("DeleteCluster", "DeleteWorkers"):
            errors.append(f"deletionRules[{i}]: {rule['policy']} not supported when ClusterSelector is set")
            continue
        if autoscaling and rule["policy"] == "DeleteWorkers":
            errors.append(f"deletionRules[{i}]: DeleteWorkers not supported with autoscaling enabled")
            continue
        status = ("JobStatus", condition["jobStatus"]) if "jobStatus" in condition else \
            ("JobDeploymentStatus", condition["jobDeploymentStatus"])  # fmt: skip
        if rule["policy"] in ttls.setdefault(status, {}):
            errors.append(f"deletionRules[{i}]: duplicate rule for {rule['policy']} and {status[1]}")
            continue
        ttls[status][rule["policy"]] = condition.get("ttlSeconds", 0)
    for status, policy_ttls in ttls.items():
        order = [policy_ttls[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in policy_ttls]
        if order != sorted(order):
            errors.append(f"for {status[0]} '{status[1]}': TTLs must follow "
                          "DeleteWorkers <= DeleteCluster <= DeleteSelf")
    return "; ".join(errors) or None


def rayjob_spec_error(spec: dict, gates: dict[str, bool]) -> str | None:
    """ValidateRayJobSpec (on the defaulted spec)."""
    shutdown, mode = spec.get("shutdownAfterJobFinishes", False), spec.get("submissionMode")
    backoff, selector = spec.get("backoffLimit"), spec.get("clusterSelector") or {}
    if spec.get("suspend") and not shutdown:
        return "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        return "TTLSecondsAfterFinished must be a non-negative integer"
    if error := deletion_error(spec, gates):
        return error
    if spec.get("suspend") and selector:
        return "the ClusterSelector mode doesn't support the suspend operation"
    if spec.get("rayClusterSpec") is None and not selector:
        return "one of RayClusterSpec or ClusterSelector must be set"
    if selector:
        if not selector.get("ray.io/cluster"):
            return "cluster name in ClusterSelector should not be empty"
        if mode == "SidecarMode":
            return "ClusterSelector is not supported in SidecarMode"
        if backoff is not None and backoff > 0:
            return "BackoffLimit is incompatible with ClusterSelector mode"
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        return "BackoffLimit is incompatible with InteractiveMode"
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None:
            return "Currently, SidecarMode doesn't support SubmitterPodTemplate"
        if spec.get("submitterConfig") is not None:
            return "Currently, SidecarMode doesn't support SubmitterConfig"
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"].get("spec", {})
        if head.get("restartPolicy", "Never") != "Never":
            return "restartPolicy for head Pod should be Never or unset when using SidecarMode"
    if spec.get("rayClusterSpec") is not None:
        cluster = spec["rayClusterSpec"]
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            return "K8s token auth mode is currently not supported for RayJob"
        if error := cluster_spec_error(cluster, gates):
            return f"The RayJob spec is invalid: {error}"
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "")
    except yaml.YAMLError as exc:
        return f"failed to unmarshal RuntimeEnvYAML: {exc}"
    if runtime_env is not None and not isinstance(runtime_env, dict):
        return "failed to unmarshal RuntimeEnvYAML: not a mapping"
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        return "activeDeadlineSeconds must be a positive integer"
    if spec.get("preRunningDeadlineSeconds") is not None and spec["preRunningDeadlineSeconds"] <= 0:
        return "preRunningDeadlineSeconds must be a positive integer"
    if backoff is not None and backoff < 0:
        return "backoffLimit must be a positive integer"
    return None


CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}),
               (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
               (0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})]  # fmt: skip
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
GO_DURATION = re.compile(r"^[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)$")


def cron_error(schedule: str) -> str | None:
    """robfig/cron v3.0.1's ParseStandard (5 fields, names, ranges, steps, descriptors). A TZ=
    prefix is not handled: ValidateRayCronJobSpec refuses any "TZ" before parsing."""

    def number(text: str, names: dict) -> int:  # parseIntOrName / mustParseInt (strconv.Atoi)
        if text.lower() in names:
            return names[text.lower()]
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"failed to parse int from {text}")
        if int(text) < 0:
            raise ValueError(f"negative number ({text}) not allowed")
        return int(text)

    if not schedule:
        return "empty spec string"
    if schedule.startswith("@"):
        every = schedule.removeprefix("@every ")
        if schedule in CRON_DESCRIPTORS or (every != schedule and GO_DURATION.match(every)):
            return None
        return f"unrecognized descriptor: {schedule}"
    fields = schedule.split()
    if len(fields) != 5:
        return f"expected exactly 5 fields, found {len(fields)}: {fields}"
    for field, (low, high, names) in zip(fields, CRON_FIELDS):
        for expr in (e for e in field.split(",") if e):
            range_and_step = expr.split("/")
            low_high = range_and_step[0].split("-")
            try:
                if low_high[0] in ("*", "?"):
                    start, end = low, high
                elif len(low_high) > 2:
                    return f"too many hyphens: {expr}"
                else:
                    start = number(low_high[0], names)
                    end = number(low_high[1], names) if len(low_high) == 2 else start
                step = 1
                if len(range_and_step) == 2:
                    step = number(range_and_step[1], {})
                    end = high if len(low_high) == 1 else end
                elif len(range_and_step) > 2:
                    return f"too many slashes: {expr}"
            except ValueError as error:
                return str(error)
            if start < low or end > high or start > end:
                return f"range {expr} is not within {low}-{high}"
            if step == 0:
                return f"step of range should be a positive number: {expr}"
    return None


def raycronjob_error(doc: dict, gates: dict[str, bool]) -> str | None:
    """ValidateRayCronJobSpec, then what the RayJob controller checks of the RayJobs it creates."""
    spec = doc["spec"]
    if "TZ" in spec["schedule"]:
        return "cannot use TZ or CRON_TZ in schedule, use timeZone field instead"
    if error := cron_error(spec["schedule"]):
        return f"invalid cron schedule: {error}"
    zone = spec.get("timeZone")
    if zone is not None:
        if zone == "":
            return "timeZone must not be empty string"
        if zone not in ("UTC", "Local"):  # Go's time.LoadLocation takes both; tzdata is bundled
            try:
                zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                return f"invalid time zone: {zone}"
    if error := rayjob_spec_error(spec["jobTemplate"], gates):
        return f"invalid RayJob template: {error}"
    child = f"{doc['metadata']['name']}-{2**26}"  # getRayJobName: <cron name>-<minutes since 1970>
    return name_errors("RayJob", child)


def operator_errors(doc: dict) -> list[str]:
    """What the KubeRay operator of the supported release refuses, on the spec as stored (CRD
    defaults applied), with the feature gates operator-values.yaml turns on."""
    kind, name = doc["kind"], doc["metadata"].get("name", "")
    doc = with_defaults(doc, crd_schema(kind, doc["apiVersion"]))
    spec, gate_values = doc["spec"], gates()
    if not gate_values.get(kind, True):
        return [f"the {kind} feature gate is off in operator-values.yaml"]
    error = name_errors(kind, name)
    if not error and kind == "RayCluster":
        error = cluster_spec_error(spec, gate_values, doc["metadata"].get("annotations"))
        error = error or upgrade_strategy_error(spec, created_by_rayjob=False)
    elif not error and kind == "RayJob":
        error = rayjob_spec_error(spec, gate_values)
        error = error or upgrade_strategy_error(spec.get("rayClusterSpec") or {}, created_by_rayjob=True)
    elif not error and kind == "RayCronJob":
        error = raycronjob_error(doc, gate_values)
    return [error] if error else []


def manifest_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(render(path.read_text()))):
            if doc is not None:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def test_kuberay_manifests_are_the_expected_kinds():
    kinds = sorted((name.split("#")[0], doc["kind"], doc["apiVersion"]) for name, doc in manifest_docs())
    assert kinds == [
        ("raycluster.yaml", "RayCluster", "ray.io/v1"),
        ("raycronjob-tag-nightly.yaml", "RayCronJob", "ray.io/v1"),
        ("rayjob-train.yaml", "RayJob", "ray.io/v1"),
        ("rayjob-tune.yaml", "RayJob", "ray.io/v1"),
    ]


@pytest.mark.parametrize("name, doc", manifest_docs(), ids=[n for n, _ in manifest_docs()])
def test_manifest_validates_against_its_crd_and_the_operator_rules(name, doc):
    assert schema_errors(doc) == [], f"{name} is refused by the {doc['kind']} CRD schema of KubeRay {KUBERAY_VERSION}"
    assert operator_errors(doc) == [], f"{name} would be refused by the KubeRay {KUBERAY_VERSION} operator"


def corrupt(doc: dict, path: str | tuple, value) -> dict:
    """A deep copy of ``doc`` with ``path`` set to ``value`` (dotted, or a tuple for keys with
    dots); the value ``DELETE`` removes the key."""
    broken = copy.deepcopy(doc)
    parts = path.split(".") if isinstance(path, str) else path
    *parents, leaf = [int(p) if p.isdigit() else p for p in parts]
    node = broken
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return broken


DELETE = object()
POD = "template.spec.containers.0.resources"
BROKEN_SCHEMA = {
    # path, bad value: each a mistake the API server rejects
    "RayCluster": [
        ("spec.workerGroupSpecs.0.maxReplicas", "eight"),  # wrong type
        ("spec.enableInTreeAutoScaling", True),  # unknown field (typo)
        (f"spec.workerGroupSpecs.0.{POD}.limits.memory", "28GB"),  # not a quantity
        (f"spec.workerGroupSpecs.0.{POD}.limits.cpu", 0.5),  # int-or-string: a float is neither
        ("spec.headGroupSpec.rayStartParams.num-cpus", 0),  # rayStartParams values are strings
        ("spec.autoscalerOptions.upscalingMode", "Fast"),  # not in the enum
        ("spec.headGroupSpec", DELETE),  # required
        ("spec.upgradeStrategy", {"type": "Rolling"}),  # enum: Recreate, None
    ],
    "RayJob": [
        ("spec.activeDeadlineSeconds", "12h"),
        ("spec.entrypoint", ["python", "jobs/train.py"]),
        ("spec.clusterSelecter", {"ray.io/cluster": "emotions"}),
        ("spec.deletionStrategy.deletionRules.0.policy", "DeleteEverything"),  # not in the enum
        ("spec.deletionStrategy.deletionRules.0.condition.jobStatus", "STOPPED"),  # enum: SUCCEEDED, FAILED
        ("spec.deletionStrategy.deletionRules.2.condition.jobStatus", "FAILED"),  # CEL: both statuses
        ("spec.deletionStrategy.deletionRules.0.condition", {"ttlSeconds": 5}),  # CEL: neither
        ("spec.deletionStrategy.onSuccess", {"policy": "DeleteSelf"}),  # CEL: legacy + rules
        ("spec.managedBy", "someone-else"),  # CEL: only two controllers
        ("spec.preRunningDeadlineSeconds", 0),  # minimum 1
        ("spec.deletionStrategy", {"deletionRules": []}),  # minItems 1
    ],
    "RayCronJob": [
        ("spec.jobTemplate.backoffLimit", "2"),
        ("spec.schedule", 230),
        ("spec.timeZone", ""),  # minLength 1
        ("spec.jobTemplate.rayClusterSpec.workerGroupSpecs.0.groupName", None),
        (("spec", "jobTemplate", "rayClusterSpec", "workerGroupSpecs", "0", *POD.split("."), "requests",
          "nvidia.com/gpu"), "one"),  # not a quantity
        ("spec.concurrencyPolicy", "Forbid"),  # batch/v1 CronJob has it; RayCronJob does not
        ("spec.jobTemplate", DELETE),  # required
    ],
}  # fmt: skip

RULES = "spec.deletionStrategy.deletionRules"
SELECTED = {"clusterSelector": {"ray.io/cluster": "emotions"}}  # a RayJob on an existing cluster
# (path, value, part of the operator's message): schema-valid, refused by the operator.
BROKEN_OPERATOR = {
    "RayCluster": [
        ("metadata.name", "Emotions_Cluster", "DNS-1123"),
        ("metadata.name", "x" * 54, "no more than 53"),
        ("metadata.name", "1-emotions", "DNS1035"),
        ("spec.workerGroupSpecs.0.minReplicas", 9, "greater than maxReplicas"),
        ("spec.workerGroupSpecs.0.rayStartParams", {"labels": "a=b"}, "rayStartParams['labels']"),
        ("spec.headGroupSpec.rayStartParams.redis-username", "ray", "redis username"),
        ("spec.workerGroupSpecs.0.suspend", True, "cannot be suspended with Autoscaler enabled"),
        ("spec.workerGroupSpecs.0.idleTimeoutSeconds", 60, "autoscaler v2 is not enabled"),
        ("spec.autoscalerOptions.idleTimeoutSeconds", -1, "must be non-negative"),
        ("spec.headGroupSpec.template.spec.containers", [], "at least one container"),
    ],
    "RayJob": [
        ("metadata.name", "x" * 48, "no more than 47"),
        ("spec.activeDeadlineSeconds", 0, "positive integer"),
        ("spec.backoffLimit", -1, "backoffLimit must be"),
        ("spec.ttlSecondsAfterFinished", 60, "cannot have TTLSecondsAfterFinished"),
        ("spec.shutdownAfterJobFinishes", True, "mutually exclusive"),  # with deletionRules
        (f"{RULES}.1.condition.ttlSeconds", 60, "DeleteCluster <= DeleteSelf"),  # self before cluster
        (f"{RULES}.1.policy", "DeleteCluster", "duplicate rule"),
        (f"{RULES}.0.policy", "DeleteWorkers", "not supported with autoscaling"),
        ("spec.runtimeEnvYAML", "- pip\n- torch", "RuntimeEnvYAML"),
        ("spec.rayClusterSpec.workerGroupSpecs.0.minReplicas", 9, "greater than maxReplicas"),
        ("spec.rayClusterSpec.upgradeStrategy", {"type": "Recreate"}, "created by RayJob"),
        ("spec.submissionMode", "InteractiveMode", None),  # accepted: no retries asked (backoffLimit 0)
    ],
    "RayCronJob": [
        ("metadata.name", "emotions-tag-nightly-and-a-long-name", None),  # 36 characters: accepted
        ("metadata.name", "emotions-tag-nightly-and-a-longer-name", "no more than 36"),
        ("metadata.name", "9-emotions", "DNS1035"),  # its RayJobs would be refused
        ("spec.schedule", "30 2 * *", "expected exactly 5 fields"),
        ("spec.schedule", "30 25 * * *", "not within 0-23"),
        ("spec.schedule", "30 2 * * MON-SUN", "not within"),  # SUN is 0: the range runs backwards
        ("spec.schedule", "*/0 * * * *", "positive number"),
        ("spec.schedule", "@fortnightly", "unrecognized descriptor"),
        ("spec.schedule", "TZ=Etc/UTC 30 2 * * *", "use timeZone field"),
        ("spec.schedule", "30 2 ? jan-dec mon-fri", None),  # names, ranges and ? are accepted
        ("spec.schedule", "@every 24h", None),
        ("spec.timeZone", "Mars/Olympus_Mons", "invalid time zone"),
        ("spec.jobTemplate.backoffLimit", -1, "backoffLimit must be"),
        ("spec.jobTemplate.submissionMode", "InteractiveMode", "incompatible with InteractiveMode"),
        ("spec.jobTemplate.rayClusterSpec", DELETE, "one of RayClusterSpec or ClusterSelector"),
    ],
}  # fmt: skip


def base_doc(kind: str, name: str | None = None) -> dict:
    return next(d for n, d in manifest_docs() if d["kind"] == kind and (name is None or n.startswith(name)))


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_validation_refuses_broken_copies(kind):
    """Each check above is live: a copy with one mistake is refused, by the named rule."""
    doc = base_doc(kind, "rayjob-train" if kind == "RayJob" else None)
    assert schema_errors(doc) == [] and operator_errors(doc) == []
    for path, value in BROKEN_SCHEMA[kind]:
        assert schema_errors(corrupt(doc, path, value)), f"{kind} with {path}={value!r} passed the schema"
    for path, value, message in BROKEN_OPERATOR[kind]:
        broken = corrupt(doc, path, value)
        assert schema_errors(broken) == [], f"{path}={value!r} should be schema-valid: {schema_errors(broken)}"
        errors = operator_errors(broken)
        if message is None:
            assert errors == [], f"{kind} with {path}={value!r} is accepted upstream, refused here: {errors}"
        else:
            assert errors and message in errors[0], f"{kind} with {path}={value!r}: {errors} (want {message!r})"


def test_rayjobs_on_an_existing_cluster_follow_upstream_rules():
    """clusterSelector mode, which no manifest here uses (a deadline there stops nothing): the
    three rules the earlier mirror missed, and one it wrongly added."""
    doc = base_doc("RayJob", "rayjob-train")
    selected = copy.deepcopy(doc)
    selected["spec"] = {k: v for k, v in doc["spec"].items() if k not in ("rayClusterSpec", "deletionStrategy")}
    selected["spec"].update(SELECTED)
    assert schema_errors(selected) == [] and operator_errors(selected) == []
    # upstream accepts shutdownAfterJobFinishes with a selector (there is nothing to shut down)
    assert operator_errors(corrupt(selected, "spec.shutdownAfterJobFinishes", True)) == []
    for path, value, message in [
        ("spec.backoffLimit", 1, "incompatible with ClusterSelector"),
        ("spec.clusterSelector", {"ray.io/cluster": ""}, "should not be empty"),
        ("spec.submissionMode", "SidecarMode", "not supported in SidecarMode"),
        ("spec.suspend", True, "not allowed to be suspended"),
        ("spec.deletionStrategy", {"deletionRules": [{"policy": "DeleteCluster",
                                                      "condition": {"jobStatus": "FAILED"}}]},
         "not supported when ClusterSelector is set"),
    ]:  # fmt: skip
        errors = operator_errors(corrupt(selected, path, value))
        assert errors and message in errors[0], f"{path}={value!r}: {errors}"
    legacy = corrupt(selected, "spec.deletionStrategy", {"onSuccess": {"policy": "DeleteSelf"},
                                                         "onFailure": {"policy": "DeleteCluster"}})  # fmt: skip
    assert "ClusterSelector mode doesn't support" in operator_errors(legacy)[0]
    interactive = corrupt(corrupt(doc, "spec.submissionMode", "InteractiveMode"), "spec.backoffLimit", 2)
    assert "incompatible with InteractiveMode" in operator_errors(interactive)[0]
    gate_off = {**gates(), "RayJobDeletionPolicy": False}
    assert "feature gate must be enabled" in rayjob_spec_error(doc["spec"], gate_off)


# ----------------------------------------------------------------------------- pods, costs, clean-up


def quantity(value) -> float:
    """A Kubernetes quantity in base units (bytes, cores)."""
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    scale = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}[suffix]  # fmt: skip
    return float(number) * scale


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec a manifest brings up: (where, spec)."""
    out = []
    for name, doc in manifest_docs():
        spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s.get("rayClusterSpec"),
                "RayCronJob": lambda s: s["jobTemplate"].get("rayClusterSpec")}[doc["kind"]](doc["spec"])  # fmt: skip
        if spec:
            out.append((name, spec))
    return out


def ray_groups(spec: dict):
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_problems(where: str, spec: dict) -> list[str]:
    """KubeRay mounts /dev/shm (emptyDir, medium Memory) sized to the Ray container's memory limit
    unless the pod mounts its own (ray-operator/controllers/ray/common/pod.go: addEmptyDir); Ray's
    object store takes 30% of that memory and spills the rest to /tmp/ray on ephemeral storage."""
    import ray._private.ray_constants as ray_constants

    problems = []
    for group_name, group in ray_groups(spec):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        if "/dev/shm" in [m["mountPath"] for m in container.get("volumeMounts", [])]:
            problems.append(f"{where} {group_name}: mounts /dev/shm; leave it to KubeRay, sized from the memory limit")
        if {"plasma-directory", "object-store-memory"} & set(group.get("rayStartParams", {})):
            problems.append(f"{where} {group_name}: sets the object store; leave it to Ray and KubeRay")
        memory = container["resources"].get("limits", {}).get("memory")
        if memory is None:
            problems.append(f"{where} {group_name}: no memory limit to size /dev/shm and the object store from")
            continue
        store = quantity(memory) * ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
        disk = quantity(container["resources"].get("requests", {}).get("ephemeral-storage", 0))
        if disk < store + 10 * 2**30:
            problems.append(f"{where} {group_name}: request ephemeral-storage >= the object store "
                            f"({store / 2**30:.1f} Gi) + 10 Gi of logs, for spilling; "
                            f"it asks {disk / 2**30:.1f} Gi")  # fmt: skip
    return problems


def test_ray_pods_get_kuberays_shared_memory_and_disk_for_spilling():
    for where, spec in cluster_specs():
        assert pod_problems(where, spec) == []
    where, spec = cluster_specs()[0]
    for path, value in [(("headGroupSpec", "template", "spec", "containers", "0", "volumeMounts"),
                          [{"name": "dshm", "mountPath": "/dev/shm"}]),
                        (("workerGroupSpecs", "0", "template", "spec", "containers", "0", "resources", "requests",
                          "ephemeral-storage"), "10Gi"),
                        (("workerGroupSpecs", "0", "rayStartParams"),
                         {"object-store-memory": "1000000000"})]:  # fmt: skip
        assert pod_problems(where, corrupt(spec, path, value)), f"{path}={value!r} passed"
    launcher = rendered(LAUNCHER)["docker"]
    assert not any("--shm-size" in option for option in launcher.get("run_options", []))  # Ray sizes it
    assert not launcher.get("disable_shm_size_detection")


def rayjob_problems(where: str, spec: dict) -> list[str]:
    """activeDeadlineSeconds only marks a RayJob Failed; on a cluster picked by clusterSelector
    KubeRay deletes nothing and the Ray job keeps its GPUs. With a cluster of its own and a
    DeleteCluster rule on jobDeploymentStatus Failed (deadline, app failure after the retries,
    failed submission), the cluster goes at once. DeleteSelf removes the RayJob and, through its
    owner reference, the submitter Job: a year of nights does not leave 365 of each."""
    if "clusterSelector" in spec or not spec.get("rayClusterSpec"):
        return [f"{where}: bring a cluster of its own (a deadline on a selected cluster stops nothing)"]
    problems = []
    if not 0 < spec.get("activeDeadlineSeconds", 0) <= 12 * 3600:
        problems.append(f"{where}: set activeDeadlineSeconds (at most 12 h)")
    listed = (spec.get("deletionStrategy") or {}).get("deletionRules", [])
    rules = {(r["policy"], r["condition"].get("jobStatus") or r["condition"].get("jobDeploymentStatus")):
             r["condition"].get("ttlSeconds", 0) for r in listed}  # fmt: skip
    if rules.get(("DeleteCluster", "Failed")) != 0:
        problems.append(f"{where}: delete the cluster at once on jobDeploymentStatus Failed (the deadline)")
    if rules.get(("DeleteCluster", "SUCCEEDED"), 10**9) > 600:
        problems.append(f"{where}: delete the cluster within 10 minutes of success")
    for status in ("SUCCEEDED", "Failed"):
        if not 0 < rules.get(("DeleteSelf", status), 0) <= 30 * 86400:
            problems.append(f"{where}: delete the RayJob (DeleteSelf) within 30 days after {status}")
    return problems


def test_every_rayjob_owns_its_cluster_which_a_deadline_or_failure_deletes_and_is_cleaned_up():
    jobs = [(name, doc["spec"]) for name, doc in manifest_docs() if doc["kind"] == "RayJob"]
    jobs += [(name, doc["spec"]["jobTemplate"]) for name, doc in manifest_docs() if doc["kind"] == "RayCronJob"]
    assert len(jobs) == 3
    for name, spec in jobs:
        assert rayjob_problems(name, spec) == []
    name, spec = jobs[0]
    selected = {k: v for k, v in spec.items() if k != "rayClusterSpec"} | SELECTED
    assert rayjob_problems(name, selected)
    assert rayjob_problems(name, corrupt(spec, "deletionStrategy.deletionRules.2.condition.ttlSeconds", 3600))
    keep_forever = {"policy": "DeleteNone", "condition": {"jobDeploymentStatus": "Failed"}}
    assert rayjob_problems(name, corrupt(spec, "deletionStrategy.deletionRules.3", keep_forever))
    assert gates()["RayJobDeletionPolicy"], "deletionStrategy needs the RayJobDeletionPolicy gate"


# ----------------------------------------------------------------------------- images and env


def dockerfile_text() -> str:
    return DOCKERFILE.read_text().replace("\\\n", " ")


def dockerfile_env() -> dict[str, str]:
    env = {}
    for line in dockerfile_text().splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    env["WORKDIR"] = re.findall(r"^WORKDIR (\S+)", dockerfile_text(), re.M)[-1]
    return env


def test_pods_run_the_project_image():
    image, workdir = storage_values()["EMOTIONS_IMAGE"], dockerfile_env()["WORKDIR"]
    for where, spec in cluster_specs():
        for group_name, group in ray_groups(spec):
            container = group["template"]["spec"]["containers"][0]
            assert container["image"] == image, f"{where}: group {group_name} runs another image"
            assert container.get("workingDir") == workdir, f"{where}: group {group_name}"
    assert rendered(LAUNCHER)["docker"]["image"] == image
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", DOCKERFILE.read_text(), re.M)
    import ray

    assert f"rayproject/ray:{ray.__version__}-" in DOCKERFILE.read_text()
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion is not the pinned Ray"


def test_image_pins_torch_to_the_base_images_cuda_and_installs_dependencies_before_the_code(tmp_path):
    text = dockerfile_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args["RAY_IMAGE"] == "rayproject/ray:2.60.0-py311-${TORCH_CUDA}", "one CUDA for base and wheel"
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"]) and re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert '"torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in text
    steps = [line for line in text.splitlines() if re.match(r"^(RUN|COPY) ", line)]
    first_code = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "emotions/" in s)
    deps = next(i for i, s in enumerate(steps) if "-r /tmp/requirements.txt" in s)
    torch_step = next(i for i, s in enumerate(steps) if "download.pytorch.org" in s)
    assert torch_step < deps < first_code, "dependencies must be installed in layers before the code is copied"
    assert "--no-deps" in next(s for s in steps[first_code:] if "pip install" in s)

    # The check after the torch install, run by bash as in the build, against a stand-in `torch`
    # module that reports a given build (importing the real one to read two strings takes seconds).
    check = re.search(r'python (-c "import os, sys, torch;.*?")\s*$', torch_step_text(text), re.S).group(1)

    def build_check(torch_build: str | None, base_cuda: str | None, torch_cuda: str) -> int:
        stub = tmp_path / (torch_build or "cpu") / "torch"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text(f"__version__ = '2.13.0'\nclass version:\n    cuda = {torch_build!r}\n")
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VERSION"}
        env |= {"TORCH_CUDA": torch_cuda, "PYTHONPATH": str(stub.parent)}
        env |= {"CUDA_VERSION": base_cuda} if base_cuda else {}
        command = f"{shlex.quote(sys.executable)} {check}"
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True).returncode

    assert build_check("12.8", "12.8.1", "cu128") == 0
    assert build_check(None, None, "cpu") == 0  # the CPU image
    assert build_check("13.0", "12.8.1", "cu128") != 0, "PyPI's CUDA 13 torch on the CUDA 12.8 base"
    assert build_check(None, "12.8.1", "cu128") != 0, "a CPU torch on the CUDA base"
    assert build_check("12.8", "12.8.1", "cu126") != 0, "TORCH_CUDA disagreeing with the base"


def torch_step_text(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("RUN ") and "download.pytorch.org" in line)


def test_docker_context_holds_exactly_what_the_dockerfile_copies():
    dockerfile = DOCKERFILE.read_text()
    copied = {src.rstrip("/") for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, re.M)
              for src in line.split()[:-1]}  # fmt: skip
    assert "." not in copied, "COPY . would bake .venv/, .git/ and local runs into the image"
    ignore = (CLUSTER / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[[i for i, l in enumerate(ignore) if l and not l.startswith("#")][0]] == "*"
    assert allowed == copied, f"Dockerfile.dockerignore lets in {sorted(allowed)}, the Dockerfile copies {sorted(copied)}"
    assert all((ROOT / path).exists() for path in copied)


def test_runtime_env_is_valid_and_matches_the_image():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the keys and value types
    assert set(env) == {"env_vars", "excludes"}, "the image carries the dependencies: no pip/py_modules/conda"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert env["env_vars"]["HF_HOME"] == dockerfile_env()["HF_HOME"], "runtime_env and image disagree on HF_HOME"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "OMP_NUM_THREADS" not in env["env_vars"], "Ray sets it per worker from its CPU count"
    assert {".venv/", ".git/"} <= set(env["excludes"])


# ----------------------------------------------------------------------------- launcher


def test_launcher_config_validates_against_ray_schema_and_names_ami_and_profiles():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = rendered(LAUNCHER)
    validator = jsonschema.Draft7Validator(schema)
    assert [e.message for e in validator.iter_errors(config)] == []
    for path, value in [("max_workers", "twelve"), ("available_node_types.gpu.resources.GPU", "one"),
                        ("docker.imagee", "x"), ("available_node_types.gpu.min_workers", 1.5)]:  # fmt: skip
        assert list(validator.iter_errors(corrupt(config, path, value))), f"{path}={value!r} passed ray-schema.json"

    # What `ray up` itself does before launching anything: fill defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(corrupt(config, "head_node_type", "gpu-head")))
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu"]["resources"]["GPU"] >= 1
    # Ray's default AMI is an old Deep Learning AMI whose driver cannot run current CUDA, and
    # workers without an instance profile cannot write checkpoints to S3.
    for name, node in nodes.items():
        assert node["node_config"]["ImageId"] == AWS_VALUES["EMOTIONS_AWS_AMI"], name
        profile = "HEAD" if name == config["head_node_type"] else "WORKER"
        assert node["node_config"]["IamInstanceProfile"] == {"Arn": AWS_VALUES[f"EMOTIONS_AWS_{profile}_PROFILE_ARN"]}


# ----------------------------------------------------------------------------- entry points

JOB = re.compile(r"^python3?$")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
OTHER_CWD = "/"  # entry points must not depend on the working directory


def entrypoints(**overrides: str) -> list[tuple[str, str, list[str]]]:
    """(manifest, script path on this checkout, args) for every entry point a manifest runs."""
    workdir, found = dockerfile_env()["WORKDIR"], []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(render(path.read_text(), **overrides)):
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            if "entrypoint" not in spec:
                continue
            words = shlex.split(spec["entrypoint"])
            assert len(words) >= 2 and JOB.match(words[0]) and re.match(rf"^{workdir}/jobs/\w+\.py$", words[1]), (
                f"{path.name}: entrypoint should be `python {workdir}/jobs/X.py ...` (an absolute path in "
                f"the image), got {spec['entrypoint']!r}")  # fmt: skip
            found.append((path.name, str(ROOT / words[1].removeprefix(workdir + "/")), words[2:]))
    return found


def run_entry_point(script: str, args: list[str] | tuple[str, ...]) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from another working directory, the checkout not on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, script, *args], cwd=OTHER_CWD, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


@functools.cache
def help_flags(script: str, args: tuple[str, ...] = ()) -> frozenset[str]:
    """The flags ``script --help`` lists. With ``args`` before ``--help``, argparse also parses
    them first, so a bad value (``--actors four``) fails here too."""
    out = run_entry_point(script, [*args, "--help"])
    assert out.returncode == 0, f"`python {script} {shlex.join(args)}` is refused:\n{out.stderr}"
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def test_manifests_name_the_expected_entry_points():
    assert sorted({Path(script).name for _, script, _ in entrypoints()}) == ["tag_nightly.py", "train.py",
                                                                             "tune.py"]  # fmt: skip


@pytest.mark.parametrize("manifest, script, args", entrypoints(), ids=[m for m, _, _ in entrypoints()])
def test_entry_point_runs_from_another_directory_with_the_manifest_flags_and_overrides(manifest, script, args):
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    unknown = flags - help_flags(script, tuple(args))
    assert not unknown, f"{manifest}: {script} does not accept {sorted(unknown)} (see `python {script} --help`)"

    overrides = [a for a in args if OVERRIDE.match(a)]
    check_config(manifest, script, args, overrides)


def check_config(manifest: str, script: str, args: list[str], overrides: list[str]) -> None:
    """Build the config the job would build, the way its CLI does before Ray starts: a bad key or
    value raises ConfigError naming it."""
    from emotions.config import build_config, from_dict

    name = Path(script).name
    if name in ("train.py", "tune.py"):
        assert "--preset" in args, f"{manifest}: name the --preset explicitly"
        preset = args[args.index("--preset") + 1]
        if name == "train.py":
            build_config(preset, overrides=overrides)
        else:
            from emotions.tuning import build_sweep_config, split_tune_settings

            from_dict(split_tune_settings(build_sweep_config(preset, None, overrides))[0])
    else:
        assert not overrides, f"{manifest}: no config checker for the overrides of {script}: {overrides}"


def test_entry_point_checks_refuse_what_the_job_would_refuse():
    from emotions.config import ConfigError

    script, train_args = next((s, tuple(a)) for _, s, a in entrypoints() if s.endswith("train.py"))
    flags = help_flags(script, train_args)  # cached from the test above
    assert "--output" in flags and "--model" not in flags
    with pytest.raises(AssertionError, match="is refused"):  # a flag given without its value
        help_flags(script, (*train_args, "--ray-address"))
    with pytest.raises(ConfigError, match="storage_pth"):
        check_config("test", script, ["--preset", "bert-base"], ["run.storage_pth=s3://b/runs"])
    with pytest.raises(ConfigError, match="num_sample"):
        check_config("test", str(ROOT / "jobs" / "tune.py"), ["--preset", "smoke"], ["tune.num_sample=4"])


def test_nightly_entry_point_finds_the_untagged_dates_from_another_directory(tmp_path):
    """The RayCronJob's exact command, its bucket pointed at a local folder, as a dry run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        (tmp_path / "dumps" / f"dt={day}").mkdir(parents=True)
        pq.write_table(pa.table({"id": ["a"], "body": ["hello"]}), tmp_path / "dumps" / f"dt={day}" / "p.parquet")
        (tmp_path / "dumps" / f"dt={day}" / "_SUCCESS").write_text("")  # the producer's marker
    (tmp_path / "tagged" / "dt=2026-01-02").mkdir(parents=True)
    (tmp_path / "tagged" / "dt=2026-01-02" / "_SUCCESS").write_text("{}")
    _, script, args = next(e for e in entrypoints(EMOTIONS_BUCKET=str(tmp_path)) if e[1].endswith("tag_nightly.py"))
    out = run_entry_point(script, [*args, "--dry-run"])
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("would tag")] == [
        "would tag 2026-01-01", "would tag 2026-01-03"]  # fmt: skip
    assert "1 already committed" in out.stdout


def test_nightly_tagging_is_date_partitioned_and_never_overwrites():
    cron = base_doc("RayCronJob")
    template = cron["spec"]["jobTemplate"]
    args = shlex.split(template["entrypoint"])
    values = storage_values()
    assert args[args.index("--input") + 1] == f"{values['EMOTIONS_DUMPS']}/dt={{date}}/"
    assert args[args.index("--output") + 1] == f"{values['EMOTIONS_TAGGED']}/dt={{date}}/"
    assert args[args.index("--model") + 1].startswith(values["EMOTIONS_BUNDLES"] + "/")
    assert "--overwrite" not in args and "--date" not in args  # every run searches for untagged dates
    assert int(args[args.index("--max-dates") + 1]) >= 1
    assert template["backoffLimit"] >= 1 and 0 < template["activeDeadlineSeconds"] < 24 * 3600
    assert cron["spec"]["timeZone"] == "Etc/UTC"  # the job's "yesterday" is a UTC date

    # The actor pool fits the GPUs the cluster can scale to (else the job waits forever).
    gpus_per_actor = float(args[args.index("--gpus-per-actor") + 1])
    actors = int(args[args.index("--actors") + 1])
    capacity = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                          .get("nvidia.com/gpu", 0))
                   for g in template["rayClusterSpec"]["workerGroupSpecs"])  # fmt: skip
    assert 0 < actors * gpus_per_actor <= capacity


# ----------------------------------------------------------------------------- the walkthrough


def doc_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, args) for every `python [.../]jobs/X.py ...` in the code blocks of a page."""
    found = []
    for block in re.findall(r"^```(?:bash)?\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"python (?:/home/ray/app/)?(jobs/\w+\.py)(.*)$", line)
            if match:
                found.append((match.group(1), shlex.split(match.group(2).split("#", 1)[0])))
    return found


def test_cluster_walkthrough_names_files_and_commands_of_this_repository():
    """docs/cluster.md: every repository path it names exists, and every job command in its code
    blocks is accepted by the job (flags, and the training overrides)."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"(?<![\w/$.])((?:cluster|jobs|tests|docs|emotions|benchmarks)/[\w./-]*[\w/])", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/cluster.md names files that do not exist: {missing}"
    commands = doc_commands(text)
    assert {script for script, _ in commands} >= {"jobs/train.py", "jobs/tune.py", "jobs/tag_nightly.py"}
    for script, args in commands:
        flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
        unknown = flags - help_flags(str(ROOT / script))
        assert not unknown, f"docs/cluster.md: `python {script}` does not accept {sorted(unknown)}"
        if script == "jobs/train.py":
            check_config("docs/cluster.md", script, args, [a for a in args if OVERRIDE.match(a)])
