"""The cluster files, checked without a cluster against the KubeRay release vendored in
tests/schemas/kuberay/<version>/ (cluster/kuberay/KUBERAY_VERSION) and the Ray pinned in pyproject.toml.

What is valid comes from KubeRay's and Ray's own files: every manifest validates against its CRD's
openAPIV3Schema (strict, as server-side field validation is; CEL rules evaluated by cel-python),
the operator values name only the release's feature gates, and the launcher file validates against
Ray's ray-schema.json. Copies with one mistake are refused, so these checks can fail. The rest is
what this project decides: versions, entry points, pod resources, RayJob clean-up, the torch pin.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import zoneinfo
from pathlib import Path

import celpy
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY_VERSION = (CLUSTER / "kuberay" / "KUBERAY_VERSION").read_text().strip()
RELEASE = Path(__file__).resolve().parent / "schemas" / "kuberay" / KUBERAY_VERSION
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
VALUES = CLUSTER / "kuberay" / "operator-values.yaml"  # Helm values for the operator, not a ray.io resource
MANIFESTS = sorted(p for p in (CLUSTER / "kuberay").glob("*.yaml") if p != VALUES)
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
# Stand-ins for the launcher's required AWS names (storage.env gives them no default).
AWS_VALUES = {
    "EMOTIONS_AWS_AMI": "ami-0123456789abcdef0",
    "EMOTIONS_AWS_HEAD_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/head",
    "EMOTIONS_AWS_WORKER_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/worker",
}
# pyproject.toml's dependencies, one quoted requirement a line (tomllib is Python 3.11+).
REQUIREMENTS = {
    r.name: r for r in map(Requirement, re.findall(r'^  "(.+)",$', (ROOT / "pyproject.toml").read_text(), re.M))
}
RAY_VERSION = str(REQUIREMENTS["ray"].specifier).removeprefix("==")  # pinned
WORKDIR = re.findall(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M)[-1]  # the project, in the image
GIB = 2**30


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def storage_values(**overrides: str) -> dict[str, str]:
    """cluster/storage.env as bash reads it, with its defaults (EMOTIONS_* cleared from the env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")} | overrides
    out = subprocess.run(
        ["bash", "-c", f"set -a; . {shlex.quote(str(CLUSTER / 'storage.env'))}; env -0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("EMOTIONS_")}


def render(text: str, **overrides: str) -> str:
    """What cluster/render.sh prints: ${NAME} replaced for the names storage.env defines."""
    values = storage_values(**AWS_VALUES, **overrides)
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


@functools.cache
def manifest_docs() -> list[tuple[str, dict]]:
    return [(path.name, yaml.safe_load(render(path.read_text()))) for path in MANIFESTS]


def doc(name: str) -> dict:
    return copy.deepcopy(dict(manifest_docs())[name])


DELETE = object()


def corrupt(document: dict, path: tuple, value) -> dict:
    """A deep copy of ``document`` with the key at ``path`` set to ``value`` (DELETE removes it)."""
    broken = copy.deepcopy(document)
    *parents, leaf = path
    node = functools.reduce(lambda n, key: n[key], parents, broken)
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return broken


# ----------------------------------------------------------------------------- versions and gates


def test_every_kuberay_ray_and_torch_version_named_is_the_pinned_one():
    assert sorted(p.name for p in RELEASE.parent.iterdir() if p.is_dir()) == [KUBERAY_VERSION]
    assert load_yaml(RELEASE / "values.yaml")["image"]["tag"] == f"v{KUBERAY_VERSION}"
    import ray

    assert ray.__version__ == RAY_VERSION, "the venv's Ray (whose ray-schema.json is used here) is not the pin"
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert REQUIREMENTS["torch"].specifier.contains(torch_pin), f"the image's torch {torch_pin} breaks pyproject"
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "jobs" / "runtime_env.yaml"]
    for path in [*docs, *(p for p in CLUSTER.rglob("*") if p.is_file())]:
        text = path.read_text()
        kuberay = set(re.findall(r"(?:KubeRay |kuberay-operator (?:--)?version |KubeRay v)(\d+\.\d+(?:\.\d+)?)", text))
        rays = set(
            re.findall(r"(?:\b[Rr]ay |rayproject/ray:|rayVersion: \"|__version__ == ')(\d+\.\d+(?:\.\d+)?)", text)
        )
        torches = set(re.findall(r"torch(?:==| )(\d+\.\d+\.\d+)", text))
        where = path.relative_to(ROOT)
        assert kuberay <= {KUBERAY_VERSION}, f"{where} names KubeRay {sorted(kuberay)}, not {KUBERAY_VERSION}"
        assert all(RAY_VERSION == v or RAY_VERSION.startswith(v + ".") for v in rays), f"{where}: Ray {sorted(rays)}"
        assert torches <= {torch_pin}, f"{where} names torch {sorted(torches)}, the image pins {torch_pin}"


def helm_gates(values: dict) -> dict[str, bool]:
    return {g["name"]: bool(g["enabled"]) for g in values["featureGates"]}


def test_operator_values_use_the_release_gates_and_differ_from_the_chart_only_as_declared():
    ours, chart = load_yaml(VALUES), load_yaml(RELEASE / "values.yaml")
    assert set(ours) == {"featureGates"}, "operator-values.yaml should change the chart's gates only"
    names = [g["name"] for g in ours["featureGates"]]
    unknown = set(names) - set((RELEASE / "feature-gates.txt").read_text().split())
    assert not unknown, f"KubeRay {KUBERAY_VERSION}'s operator exits on unknown feature gates {sorted(unknown)}"
    # Helm replaces a list as a whole: ours must list every gate the chart lists.
    assert sorted(names) == sorted(helm_gates(chart)), "featureGates must be the chart's list, values changed"
    changed = {(n, v) for n, v in helm_gates(ours).items() if helm_gates(chart)[n] != v}
    declared = {
        (n, yaml.safe_load(v))
        for n, v in re.findall(r"^# change: featureGates\[(\w+)\]\.enabled = (\w+)$", VALUES.read_text(), re.M)
    }
    assert changed == declared, (
        f"operator-values.yaml changes {sorted(changed)}, its comment declares {sorted(declared)}"
    )
    kinds = {d["kind"] for _, d in manifest_docs()}
    uses_deletion_rules = any("deletionRules" in json.dumps(d) for _, d in manifest_docs())
    assert helm_gates(ours)["RayCronJob"] or "RayCronJob" not in kinds
    assert helm_gates(ours)["RayJobDeletionPolicy"] or not uses_deletion_rules


# ----------------------------------------------------------------------------- storage.env and render.sh


def test_every_placeholder_is_defined_in_storage_env():
    values = storage_values()
    assert {k for k, v in values.items() if not v} == set(AWS_VALUES), "only the AWS names are required"
    for path in [*MANIFESTS, LAUNCHER]:
        unknown = set(PLACEHOLDER.findall(path.read_text())) - set(values) - {"RAY_HEAD_IP"}
        assert not unknown, f"{path.relative_to(ROOT)} uses {sorted(unknown)}, not defined in cluster/storage.env"


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext-base) is not installed")
def test_render_script_fills_the_storage_names_and_refuses_missing_aws_names():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}

    def run(path: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(CLUSTER / "render.sh"), str(path)], capture_output=True, text=True, env=clean | env
        )

    out = run(LAUNCHER, **AWS_VALUES)
    assert out.returncode == 0 and out.stdout == render(LAUNCHER.read_text()), out.stderr
    assert "$RAY_HEAD_IP" in out.stdout  # other `$` pass through untouched
    assert run(MANIFESTS[0]).returncode == 0  # a KubeRay manifest needs none of the AWS names
    out = run(LAUNCHER, **{k: v for k, v in AWS_VALUES.items() if k != "EMOTIONS_AWS_AMI"})
    assert out.returncode == 2 and "EMOTIONS_AWS_AMI is empty" in out.stderr, out.stderr


# ----------------------------------------------------------------------------- CRD schemas


def strict(schema: dict) -> dict:
    """An openAPIV3Schema as a JSON Schema that refuses what the API server refuses: unknown
    fields where the schema lists properties (unless x-kubernetes-preserve-unknown-fields),
    ``nullable``, and int-or-string (a quantity's ``pattern`` applies to strings only)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {name: strict(sub) for name, sub in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    if s.get("x-kubernetes-int-or-string"):
        s.pop("anyOf", None)
        s["type"] = ["integer", "string"]
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(sub) for sub in s[key]]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


@functools.cache
def cel_program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations. Transition rules (those reading oldSelf) run on updates only."""
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue
        try:
            ok = cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(instance)})
        except celpy.CELEvalError as error:
            ok = error
        if not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            yield jsonschema.ValidationError(f"{rule.get('message', rule['rule'])} ({ok!r})")


StrictValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-validations": cel_rules})


@functools.cache
def crd(kind: str) -> dict:
    assert kind in CRD_FILES, f"no CRD for kind {kind!r}; known: {sorted(CRD_FILES)}"
    return load_yaml(RELEASE / CRD_FILES[kind])


@functools.cache
def crd_validator(kind: str, api_version: str):
    spec = crd(kind)["spec"]
    group, _, version = api_version.partition("/")
    served = {v["name"]: v for v in spec["versions"] if v.get("served")}
    assert group == spec["group"] and version in served, f"{kind}: {api_version} is not served"
    return StrictValidator(strict(served[version]["schema"]["openAPIV3Schema"]))


def schema_errors(document: dict) -> list[str]:
    validator = crd_validator(document["kind"], document["apiVersion"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("name", [p.name for p in MANIFESTS])
def test_manifest_validates_against_its_crd(name):
    assert schema_errors(doc(name)) == [], f"{name} is refused by the KubeRay {KUBERAY_VERSION} CRD schema"


def test_every_cel_rule_of_the_release_compiles():
    def rules(node):
        if isinstance(node, dict):
            yield from (r["rule"] for r in node.get("x-kubernetes-validations", []))
            yield from (rule for value in node.values() for rule in rules(value))
        elif isinstance(node, list):
            yield from (rule for value in node for rule in rules(value))

    found = {rule for kind in CRD_FILES for rule in rules(crd(kind))}
    assert len(found) >= 5
    for rule in found:
        cel_program(rule)  # raises CELParseError on a rule cel-python cannot read


GPU_LIMITS = ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits")
RULES = ("spec", "deletionStrategy", "deletionRules")
BROKEN = [  # (manifest, path, bad value, part of the error): each refused by the API server
    ("raycluster.yaml", ("spec", "enableInTreeAutoScaling"), True, "Additional properties"),  # a typo
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "maxReplicas"), "eight", "is not of type"),
    ("raycluster.yaml", (*GPU_LIMITS, "memory"), "28GB", "does not match"),  # not a quantity
    ("raycluster.yaml", (*GPU_LIMITS, "cpu"), 0.5, "is not of type"),  # int-or-string: a float is neither
    ("raycluster.yaml", ("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "is not of type"),
    ("raycluster.yaml", ("spec", "headGroupSpec"), DELETE, "is a required property"),
    ("raycluster.yaml", ("spec", "managedBy"), "someone-else", "managedBy field value must be"),  # CEL
    ("rayjob-train.yaml", ("spec", "activeDeadlineSeconds"), "12h", "is not of type"),
    ("rayjob-train.yaml", (*RULES, 0, "policy"), "DeleteEverything", "is not one of"),
    ("rayjob-train.yaml", (*RULES, 2, "condition", "jobStatus"), "FAILED", "cannot be used together"),  # CEL
    ("rayjob-train.yaml", (*RULES, 0, "condition"), {"ttlSeconds": 5}, "requires either"),  # CEL
    ("rayjob-train.yaml", ("spec", "deletionStrategy", "onSuccess"), {"policy": "DeleteSelf"}, "legacy"),  # CEL
    ("raycronjob-tag-nightly.yaml", ("spec", "concurrencyPolicy"), "Forbid", "Additional properties"),
    ("raycronjob-tag-nightly.yaml", ("spec", "schedule"), 230, "is not of type"),
    ("raycronjob-tag-nightly.yaml", ("spec", "jobTemplate"), DELETE, "is a required property"),
]


@pytest.mark.parametrize("name, path, value, message", BROKEN, ids=[f"{n}:{p[-1]}" for n, p, _, _ in BROKEN])
def test_schema_refuses_a_copy_with_one_mistake(name, path, value, message):
    errors = schema_errors(corrupt(doc(name), path, value))
    assert any(message in e for e in errors), f"{name} with {path}={value!r}: {errors}"


# ----------------------------------------------------------------------------- pods and clean-up


def quantity(value) -> float:
    """A Kubernetes quantity in base units (bytes, cores)."""
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    scale = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": GIB, "Ti": 2**40}
    return float(number) * scale[suffix]


def rayjob_specs() -> list[tuple[str, dict]]:
    return [(name, d["spec"].get("jobTemplate", d["spec"])) for name, d in manifest_docs() if d["kind"] != "RayCluster"]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec a manifest brings up: (manifest, spec)."""
    found = []
    for name, d in manifest_docs():
        spec = d["spec"].get("jobTemplate", d["spec"])
        found.append((name, spec.get("rayClusterSpec", spec)))
    return found


def ray_groups(spec: dict):
    yield "head", spec["headGroupSpec"]
    yield from ((g["groupName"], g) for g in spec.get("workerGroupSpecs", []))


def pod_problems(where: str, spec: dict) -> list[str]:
    """KubeRay mounts /dev/shm sized to the Ray container's memory limit unless the pod mounts its
    own; Ray's object store takes a share of it and spills the rest to ephemeral storage."""
    from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION as STORE_SHARE

    problems, image = [], storage_values()["EMOTIONS_IMAGE"]
    for group_name, group in ray_groups(spec):
        at = f"{where} {group_name}"
        container = group["template"]["spec"]["containers"][0]
        if (container["image"], container.get("workingDir")) != (image, WORKDIR):
            problems.append(f"{at}: run the project's image ({image}) in its WORKDIR {WORKDIR}")
        requests, limits = container["resources"].get("requests", {}), container["resources"].get("limits", {})
        if "/dev/shm" in [m["mountPath"] for m in container.get("volumeMounts", [])]:
            problems.append(f"{at}: mounts /dev/shm; leave it to KubeRay, sized from the memory limit")
        if {"plasma-directory", "object-store-memory"} & set(group.get("rayStartParams", {})):
            problems.append(f"{at}: sets the object store; leave it to Ray and KubeRay")
        for resource in ("cpu", "memory", "nvidia.com/gpu"):
            if requests.get(resource) != limits.get(resource):
                problems.append(f"{at}: {resource} request {requests.get(resource)} != limit {limits.get(resource)}")
        if "memory" not in limits:
            problems.append(f"{at}: no memory limit")
            continue
        disk = quantity(requests.get("ephemeral-storage", 0))
        if disk < quantity(limits["memory"]) * STORE_SHARE + 10 * GIB:
            problems.append(f"{at}: ephemeral-storage {disk / GIB:.0f} Gi holds no full object store + 10 Gi of logs")
        gpus = limits.get("nvidia.com/gpu", 0)
        tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
        if (group_name == "gpu") != (gpus >= 1) or (gpus >= 1) != ("nvidia.com/gpu" in tolerated):
            problems.append(f"{at}: the gpu group, and only it, asks whole GPUs and tolerates the GPU taint")
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append(f"{where}: the head must take no tasks (num-cpus 0)")
    return problems


def test_ray_pods_ask_fixed_resources_gpus_and_disk_for_spilling():
    for where, spec in cluster_specs():
        assert pod_problems(where, spec) == []
    where, spec = cluster_specs()[0]
    container = ("workerGroupSpecs", 0, "template", "spec", "containers", 0)
    for path, value in [
        (
            ("headGroupSpec", "template", "spec", "containers", 0, "volumeMounts"),
            [{"name": "dshm", "mountPath": "/dev/shm"}],
        ),
        ((*container, "resources", "requests", "ephemeral-storage"), "10Gi"),
        ((*container, "resources", "requests", "cpu"), "2"),
        ((*container, "resources", "limits", "nvidia.com/gpu"), 2),
        (("workerGroupSpecs", 0, "template", "spec", "tolerations"), []),
        (("workerGroupSpecs", 0, "rayStartParams"), {"object-store-memory": "1000000000"}),
        ((*container, "image"), "rayproject/ray:latest"),
    ]:
        assert pod_problems(where, corrupt(spec, path, value)), f"{path}={value!r} passed"


def rayjob_problems(where: str, spec: dict) -> list[str]:
    """activeDeadlineSeconds only marks a RayJob Failed: with a cluster of its own and a
    DeleteCluster rule on jobDeploymentStatus Failed, the cluster goes at once. DeleteSelf removes
    the RayJob and its submitter Job, so a year of nights does not leave 365 of each."""
    if "clusterSelector" in spec or not spec.get("rayClusterSpec"):
        return [f"{where}: bring a cluster of its own (a deadline on a selected cluster stops nothing)"]
    problems = []
    if not 0 < spec.get("activeDeadlineSeconds", 0) <= 12 * 3600:
        problems.append(f"{where}: set activeDeadlineSeconds (at most 12 h)")
    if "shutdownAfterJobFinishes" in spec or "ttlSecondsAfterFinished" in spec:
        problems.append(f"{where}: clean up with deletionRules only")
    rules = {}  # (policy, status) -> ttlSeconds
    for rule in spec.get("deletionStrategy", {}).get("deletionRules", []):
        condition = rule["condition"]
        status = condition.get("jobStatus") or condition.get("jobDeploymentStatus")
        rules[rule["policy"], status] = condition.get("ttlSeconds", 0)
    if rules.get(("DeleteCluster", "Failed")) != 0:
        problems.append(f"{where}: delete the cluster at once on jobDeploymentStatus Failed (the deadline)")
    if rules.get(("DeleteCluster", "SUCCEEDED"), 10**9) > 600:
        problems.append(f"{where}: delete the cluster within 10 minutes of success")
    for status in ("SUCCEEDED", "Failed"):
        if not 0 < rules.get(("DeleteSelf", status), 0) <= 30 * 86400:
            problems.append(f"{where}: delete the RayJob (DeleteSelf) within 30 days after {status}")
    return problems


def test_every_rayjob_owns_its_cluster_which_a_deadline_deletes_and_is_cleaned_up():
    assert len(rayjob_specs()) == 3
    for name, spec in rayjob_specs():
        assert rayjob_problems(name, spec) == []
    name, spec = rayjob_specs()[0]
    selected = {k: v for k, v in spec.items() if k != "rayClusterSpec"} | {"clusterSelector": {"ray.io/cluster": "x"}}
    keep_forever = {"policy": "DeleteNone", "condition": {"jobDeploymentStatus": "Failed"}}
    for broken in [
        selected,
        corrupt(spec, ("deletionStrategy", "deletionRules", 2, "condition", "ttlSeconds"), 3600),
        corrupt(spec, ("deletionStrategy", "deletionRules", 3), keep_forever),
        corrupt(spec, ("activeDeadlineSeconds",), DELETE),
    ]:
        assert rayjob_problems(name, broken)


# ----------------------------------------------------------------------------- entry points

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def entrypoints() -> dict[str, tuple[Path, list[str]]]:
    """manifest -> (script on this checkout, args) for every manifest with an entrypoint."""
    found = {}
    for name, spec in rayjob_specs():
        python, script, *args = shlex.split(spec["entrypoint"])
        in_image = python == "python" and re.fullmatch(rf"{WORKDIR}/jobs/\w+\.py", script)
        assert in_image, f"{name}: run `python {WORKDIR}/jobs/X.py` (absolute, in the image), not {script}"
        found[name] = (ROOT / script.removeprefix(WORKDIR + "/"), args)
    return found


@functools.cache
def help_flags(script: Path, args: tuple[str, ...] = ()) -> frozenset[str]:
    """The flags ``python SCRIPT ARGS --help`` lists, run from another working directory (argparse
    parses ARGS first, so a bad value fails here too)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(script), *args, "--help"], cwd="/", capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, f"`python {script.name} {shlex.join(args)}` is refused:\n{out.stderr}"
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def check_overrides(script: Path, args: list[str]) -> None:
    """Build the config the job builds before Ray starts: a bad key or value raises ConfigError."""
    from emotions.config import build_config, from_dict

    overrides = [a for a in args if OVERRIDE.match(a)]
    preset = args[args.index("--preset") + 1] if "--preset" in args else None
    if script.name == "train.py":
        build_config(preset, overrides=overrides)
    elif script.name == "tune.py":
        from emotions.tuning import build_sweep_config, split_tune_settings

        from_dict(split_tune_settings(build_sweep_config(preset, None, overrides))[0])
    else:
        assert not overrides, f"no config checker for the overrides of {script.name}: {overrides}"


def test_manifests_are_the_expected_kinds_and_run_the_expected_jobs():
    kinds = {name: (d["apiVersion"], d["kind"]) for name, d in manifest_docs()}
    assert kinds == {
        "raycluster.yaml": ("ray.io/v1", "RayCluster"),
        "rayjob-train.yaml": ("ray.io/v1", "RayJob"),
        "rayjob-tune.yaml": ("ray.io/v1", "RayJob"),
        "raycronjob-tag-nightly.yaml": ("ray.io/v1", "RayCronJob"),
    }
    jobs = {name: script.name for name, (script, _) in entrypoints().items() if script.is_file()}
    assert jobs == {
        "raycronjob-tag-nightly.yaml": "tag_nightly.py",
        "rayjob-train.yaml": "train.py",
        "rayjob-tune.yaml": "tune.py",
    }


@pytest.mark.parametrize("manifest", ["raycronjob-tag-nightly.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"])
def test_job_accepts_the_flags_and_overrides_its_manifest_passes(manifest):
    script, args = entrypoints()[manifest]
    assert "--preset" in args or script.name == "tag_nightly.py", f"{manifest}: name the --preset explicitly"
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    unknown = flags - help_flags(script, tuple(args))
    assert not unknown, f"{manifest}: {script.name} does not accept {sorted(unknown)}"
    check_overrides(script, args)


def test_entry_point_checks_refuse_what_the_job_refuses():
    from emotions.config import ConfigError

    script, args = entrypoints()["raycronjob-tag-nightly.yaml"]
    with pytest.raises(AssertionError, match="is refused"):
        help_flags(script, (*args, "--actors", "four"))
    script, args = entrypoints()["rayjob-train.yaml"]
    with pytest.raises(ConfigError, match="storage_pth"):
        check_overrides(script, [*args, "run.storage_pth=s3://b/runs"])


def ray_resources(group: dict) -> dict[str, float]:
    """The Ray resources of one pod of a worker group, as KubeRay 1.7.0 derives them
    (``generateRayStartCommand``): ``num-cpus``/``num-gpus`` from rayStartParams, else the Ray
    container's CPU limit rounded up and its ``nvidia.com/gpu`` limit."""
    container = group["template"]["spec"]["containers"][0]
    limits = {**container["resources"].get("requests", {}), **container["resources"].get("limits", {})}
    params = group.get("rayStartParams", {})
    found = {"CPU": float(params.get("num-cpus", math.ceil(quantity(limits["cpu"]))))}
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return found | ({"GPU": gpus} if gpus else {})


def test_every_head_declares_its_worker_groups_as_the_spec_does():
    """Ray 2.60's autoscaler does not tell the driver how large the cluster may grow, so each
    manifest says it on its head (EMOTIONS_NODE_GROUPS, read by emotions/cluster.py): it must be
    the workerGroupSpecs' maxReplicas and Ray resources, or a plan is made for a cluster that is
    not there."""
    from emotions.cluster import NODE_GROUPS_ENV, NodeGroup, parse_node_groups

    for name, spec in cluster_specs():
        assert spec.get("enableInTreeAutoscaling"), name
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        declared = {e["name"]: e["value"] for e in head.get("env", [])}.get(NODE_GROUPS_ENV)
        assert declared, f"{name}: the head has no {NODE_GROUPS_ENV}"
        expected = [NodeGroup(g["groupName"], ray_resources(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]]
        assert parse_node_groups(declared) == expected, name


def test_jobs_fit_the_clusters_their_manifests_bring_up():
    from emotions.config import build_config

    specs = dict(cluster_specs())
    groups = {name: {g: group for g, group in ray_groups(spec)} for name, spec in specs.items()}

    def pod(name: str, group: str) -> dict:
        return groups[name][group]["template"]["spec"]["containers"][0]["resources"]["limits"]

    script, args = entrypoints()["rayjob-train.yaml"]
    config = build_config(args[args.index("--preset") + 1], overrides=[a for a in args if OVERRIDE.match(a)])
    s, gpu_pod = config.scaling, pod("rayjob-train.yaml", "gpu")
    assert s.use_gpu and "gpu" in groups["rayjob-train.yaml"]
    per_pod = int(gpu_pod["nvidia.com/gpu"])  # one worker per GPU
    if s.placement == "strict_pack":  # every worker on one pod: no gradient crosses the network
        assert s.num_workers <= per_pod and s.num_workers * s.cpus_per_worker < quantity(gpu_pod["cpu"])
    else:
        assert s.num_workers <= groups["rayjob-train.yaml"]["gpu"]["maxReplicas"] * per_pod
        assert s.cpus_per_worker * per_pod < quantity(gpu_pod["cpu"])

    _, args = entrypoints()["raycronjob-tag-nightly.yaml"]
    actors, gpus_per_actor = int(args[args.index("--actors") + 1]), float(args[args.index("--gpus-per-actor") + 1])
    nightly = groups["raycronjob-tag-nightly.yaml"]
    gpus = {name: pod("raycronjob-tag-nightly.yaml", name).get("nvidia.com/gpu", 0) for name in nightly}
    capacity = sum(g.get("maxReplicas", 1) * gpus[name] for name, g in nightly.items())
    assert 0 < actors * gpus_per_actor <= capacity, "the actor pool must fit the GPUs the cluster scales to"
    _, args = entrypoints()["rayjob-tune.yaml"]  # the smoke sweep runs on the cpu group
    assert "gpu" not in groups["rayjob-tune.yaml"] and "scaling.use_gpu=true" not in args


def test_nightly_runs_daily_in_utc_on_date_partitions_and_never_overwrites():
    cron = doc("raycronjob-tag-nightly.yaml")["spec"]
    minute, hour, *rest = cron["schedule"].split()
    assert rest == ["*", "*", "*"] and 0 <= int(minute) < 60 and 0 <= int(hour) < 24, "once a day at a fixed time"
    assert cron["timeZone"] == "Etc/UTC" and zoneinfo.ZoneInfo(cron["timeZone"])  # "yesterday" is a UTC date
    assert cron["suspend"] is False
    template, values = cron["jobTemplate"], storage_values()
    args = shlex.split(template["entrypoint"])
    assert args[args.index("--input") + 1] == f"{values['EMOTIONS_DUMPS']}/dt={{date}}/"
    assert args[args.index("--output") + 1] == f"{values['EMOTIONS_TAGGED']}/dt={{date}}/"
    assert args[args.index("--model") + 1].startswith(values["EMOTIONS_BUNDLES"] + "/")
    assert "--overwrite" not in args and "--date" not in args  # every run searches for untagged dates
    assert int(args[args.index("--max-dates") + 1]) >= 1
    assert template["backoffLimit"] >= 1 and template["activeDeadlineSeconds"] < 24 * 3600


def test_cluster_walkthrough_names_files_and_commands_of_this_repository():
    text = (ROOT / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"(?<![\w/$.])((?:cluster|jobs|tests|docs|emotions|benchmarks)/[\w./-]*[\w/])", text))
    assert not sorted(p for p in paths if not (ROOT / p).exists()), "docs/cluster.md names missing files"
    commands = []
    for block in re.findall(r"^```(?:bash)?\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if match := re.search(r"python (?:/home/ray/app/)?(jobs/\w+\.py)(.*)$", line):
                commands.append((ROOT / match.group(1), shlex.split(match.group(2).split("#", 1)[0])))
    assert {script.name for script, _ in commands} >= {"train.py", "tune.py", "tag_nightly.py"}
    for script, args in commands:
        unknown = {a.split("=", 1)[0] for a in args if a.startswith("--")} - help_flags(script)
        assert not unknown, f"docs/cluster.md: `python jobs/{script.name}` does not accept {sorted(unknown)}"


# ----------------------------------------------------------------------------- image and launcher


def test_image_pins_torch_to_the_base_images_cuda_and_installs_dependencies_first(tmp_path):
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args["RAY_IMAGE"] == f"rayproject/ray:{RAY_VERSION}-py311-${{TORCH_CUDA}}", "one CUDA for base and wheel"
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"]) and re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    steps = [line for line in text.splitlines() if re.match(r"^(RUN|COPY) ", line)]
    torch_step = next(s for s in steps if "download.pytorch.org" in s)
    assert '"torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in torch_step
    code = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "emotions/" in s)
    deps = next(i for i, s in enumerate(steps) if "-r /tmp/requirements.txt" in s)
    assert steps.index(torch_step) < deps < code, "dependencies go in layers before the code is copied"
    assert "-c /tmp/constraints.txt" in steps[deps] and "--no-deps" in steps[code + 1]

    # The build's check, run by bash as in the build, against a stand-in torch reporting a build.
    check = re.search(r'python (-c "import os, sys, torch;.*?")\s*$', torch_step, re.S).group(1)

    def build_check(torch_cuda_build: str | None, base_cuda: str | None, torch_cuda: str) -> int:
        stub = tmp_path / (torch_cuda_build or "cpu") / "torch"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text(f"__version__ = '0'\nclass version:\n    cuda = {torch_cuda_build!r}\n")
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VERSION"}
        env |= {"TORCH_CUDA": torch_cuda, "PYTHONPATH": str(stub.parent)} | (
            {"CUDA_VERSION": base_cuda} if base_cuda else {}
        )
        command = f"{shlex.quote(sys.executable)} {check}"
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True).returncode

    assert build_check("12.8", "12.8.1", "cu128") == 0
    assert build_check(None, None, "cpu") == 0  # the CPU image
    assert build_check("13.0", "12.8.1", "cu128") != 0, "PyPI's CUDA 13 torch on the CUDA 12.8 base"
    assert build_check(None, "12.8.1", "cu128") != 0, "a CPU torch on the CUDA base"


def test_docker_context_holds_exactly_what_the_dockerfile_copies():
    copies = re.findall(r"^COPY (?:--\S+ )*(.+)$", DOCKERFILE.read_text(), re.M)
    copied = {source.rstrip("/") for line in copies for source in line.split()[:-1]}
    ignore = (CLUSTER / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line for line in ignore if line and not line.startswith("#")]
    assert ignore[0] == "*" and "." not in copied, "an allow-list: never .venv/ or .git/"
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == copied
    assert all((ROOT / path).exists() for path in copied)


def test_launcher_config_validates_against_ray_schema_and_names_ami_and_profiles():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    config = yaml.safe_load(render(LAUNCHER.read_text()))
    assert [e.message for e in validator.iter_errors(config)] == []
    for path, value in [
        (("max_workers",), "twelve"),
        (("available_node_types", "gpu", "resources", "GPU"), "one"),
        (("docker", "imagee"), "x"),
        (("available_node_types", "gpu", "min_workers"), 1.5),
        (("provider",), DELETE),
    ]:
        assert list(validator.iter_errors(corrupt(config, path, value))), f"{path}={value!r} passed ray-schema.json"
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head takes no tasks
    assert nodes["gpu"]["resources"]["GPU"] >= 1 and sum(n.get("max_workers", 0) for n in nodes.values()) >= 1
    assert config["docker"]["image"] == storage_values()["EMOTIONS_IMAGE"]
    assert not any("--shm-size" in option for option in config["docker"]["run_options"])  # Ray sizes /dev/shm
    # Ray's default AMI's driver cannot run current CUDA; workers without a profile cannot write to S3.
    for name, node in nodes.items():
        profile = "HEAD" if name == config["head_node_type"] else "WORKER"
        assert node["node_config"]["ImageId"] == AWS_VALUES["EMOTIONS_AWS_AMI"], name
        assert node["node_config"]["IamInstanceProfile"] == {"Arn": AWS_VALUES[f"EMOTIONS_AWS_{profile}_PROFILE_ARN"]}
