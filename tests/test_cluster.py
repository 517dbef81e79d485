"""The cluster files are checked the way the cluster would check them, without a cluster.

- Every manifest in cluster/kuberay validates against its KubeRay CRD's openAPIV3Schema, made strict
  the way `kubectl apply` (server-side field validation) is: unknown fields are errors. On top of the
  schema, the rules the KubeRay operator enforces when it reconciles (names, RayJob mode, cron
  schedule) are checked, and a deliberately broken copy of each manifest must be refused, so none of
  these checks is vacuous.
- cluster/launcher/aws-gpu.yaml validates against Ray's ray-schema.json and Ray's own `ray up` checks.
- Every `python jobs/X.py ...` entry point named in a manifest exists and accepts the flags the
  manifest passes (`--help`), and its KEY=VALUE overrides build a valid config.
- The placeholders, image, working directory and HF_HOME agree across storage.env, the manifests,
  the Dockerfile and jobs/runtime_env.yaml.

The CRDs in tests/schemas/kuberay/ are copied unchanged from ray-project/kuberay
(ray-operator/config/crd/bases/, commit feeaf72facab4881ba2b179248bb67315634e229, Apache-2.0).
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
CRD_DIR = Path(__file__).resolve().parent / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}  # fmt: skip
NOT_RESOURCES = {"operator-values.yaml"}  # Helm values for the operator, not a ray.io resource
MANIFESTS = sorted(p for p in (CLUSTER / "kuberay").glob("*.yaml") if p.name not in NOT_RESOURCES)
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# ----------------------------------------------------------------------------- storage.env


@functools.cache
def storage_values() -> dict[str, str]:
    """cluster/storage.env as bash reads it, with its defaults (EMOTIONS_* cleared from the env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}
    out = subprocess.run(["bash", "-c", f"set -a; . {shlex.quote(str(CLUSTER / 'storage.env'))}; env -0"],
                         env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("EMOTIONS_")}


def render(text: str) -> str:
    """What cluster/render.sh prints: ${NAME} replaced for the names storage.env defines."""
    values = storage_values()
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def rendered(path: Path) -> dict:
    return yaml.safe_load(render(path.read_text()))


def test_every_placeholder_is_defined_in_storage_env():
    values = storage_values()
    assert {"EMOTIONS_IMAGE", "EMOTIONS_RUNS", "EMOTIONS_BUNDLES", "EMOTIONS_DUMPS",
            "EMOTIONS_TAGGED"} <= set(values)  # fmt: skip
    assert all(values.values()), f"empty defaults in storage.env: {values}"
    for path in [*MANIFESTS, LAUNCHER]:
        unknown = set(PLACEHOLDER.findall(path.read_text())) - set(values) - {"RAY_HEAD_IP"}
        assert not unknown, f"{path.relative_to(ROOT)} uses {sorted(unknown)}, not defined in cluster/storage.env"
        assert not re.search(r"\$\{EMOTIONS_\w+\}", render(path.read_text()))


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext-base) is not installed")
def test_render_script_fills_exactly_the_storage_names():
    for path in [*MANIFESTS, LAUNCHER]:
        out = subprocess.run(["bash", str(CLUSTER / "render.sh"), str(path)], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")})  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout == render(path.read_text()), f"render.sh and the test disagree on {path.name}"
    assert "$RAY_HEAD_IP" in render(LAUNCHER.read_text())  # other `$` pass through untouched


# ----------------------------------------------------------------------------- CRD schemas


def strict(schema: dict) -> dict:
    """An openAPIV3Schema as a JSON Schema that refuses what the API server refuses.

    - Objects with ``properties`` get ``additionalProperties: false``: kubectl's strict field
      validation rejects unknown fields (a typo like ``enableInTreeAutoScaling`` fails here).
    - ``nullable: true`` becomes ``type: [T, "null"]``.
    - ``x-kubernetes-int-or-string`` fields already carry ``anyOf: [integer, string]`` plus a quantity
      ``pattern`` that applies to strings only, so ``cpu: 1``, ``cpu: "500m"`` and ``memory: 8Gi``
      pass and ``memory: 8GB`` or ``cpu: 0.5`` do not, as with the API server.
    - Other ``x-kubernetes-*`` keys and ``format`` are extensions/annotations jsonschema ignores.
      ``x-kubernetes-validations`` (CEL) rules are not evaluated; the manifests use none of the
      fields that carry them (managedBy, deletionStrategy, gcsFaultToleranceOptions).
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
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    assert kind in CRD_FILES, f"no CRD for kind {kind!r}; known: {sorted(CRD_FILES)}"
    crd = load_yaml(CRD_DIR / CRD_FILES[kind])
    group, _, version = api_version.partition("/")
    assert group == crd["spec"]["group"], f"{kind}: apiVersion group {group!r} is not {crd['spec']['group']!r}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind}: version {version!r} is not served; served: {sorted(served)}"
    return jsonschema.Draft7Validator(strict(served[version]["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc.get("kind"), doc.get("apiVersion", ""))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]  # fmt: skip


# ----------------------------------------------------------------------------- operator rules

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # KubeRay: 63 - len("-serve-svc"); RayJob: minus 6
CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
CRON_NAMES = {3: "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC", 4: "SUN MON TUE WED THU FRI SAT"}
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(schedule: str) -> list[str]:
    """Standard 5-field cron, as robfig/cron's ParseStandard (used by KubeRay) accepts it."""
    schedule = re.sub(r"^(CRON_)?TZ=\S+\s+", "", schedule.strip())
    if schedule in CRON_DESCRIPTORS or schedule.startswith("@every "):
        return []
    fields = schedule.split()
    if len(fields) != 5:
        return [f"schedule {schedule!r}: expected 5 fields (minute hour day-of-month month day-of-week)"]
    errors = []
    for i, (field, (low, high)) in enumerate(zip(fields, CRON_FIELDS)):
        names = CRON_NAMES.get(i, "").split()
        for part in field.split(","):
            spec, _, step = part.partition("/")
            if step and not step.isdigit():
                errors.append(f"schedule field {field!r}: bad step {step!r}")
            if spec in ("*", "?"):
                continue
            for value in spec.split("-"):
                number = names.index(value.upper()) + (i == 3) if value.upper() in names else value
                if not str(number).isdigit() or not low <= int(number) <= high:
                    errors.append(f"schedule field {field!r}: {value!r} is not in {low}-{high}")
    return errors


def cluster_spec_errors(spec: dict, where: str) -> list[str]:
    errors = []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group["template"].get("spec", {}).get("containers"):
            errors.append(f"{where} group {name}: the pod template has no container")
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where} group {name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{where} group {name}: rayStartParams['labels'] is refused; use the group's labels")
        if group.get("suspend") and spec.get("enableInTreeAutoscaling"):
            errors.append(f"{where} group {name}: cannot be suspended with the autoscaler enabled")
    for group in spec.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not 0 <= low <= high or not low <= group.get("replicas", low) <= high:
            errors.append(f"{where} group {group['groupName']}: need 0 <= minReplicas <= replicas <= maxReplicas")
    import ray

    if spec.get("rayVersion") != ray.__version__:
        errors.append(f"{where} rayVersion {spec.get('rayVersion')!r} is not the pinned Ray {ray.__version__}")
    return errors


def rayjob_spec_errors(spec: dict, where: str) -> list[str]:
    """ValidateRayJobSpec of the KubeRay operator (the parts that apply to these manifests)."""
    errors = []
    selector = spec.get("clusterSelector") or {}
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        errors.append(f"{where}: suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if not selector and "rayClusterSpec" not in spec:
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector and not selector.get("ray.io/cluster"):
        errors.append(f"{where}: clusterSelector needs a non-empty ray.io/cluster")
    if selector and shutdown:
        errors.append(f"{where}: shutdownAfterJobFinishes has no cluster to shut down with clusterSelector")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        errors.append(f"{where}: activeDeadlineSeconds must be positive")
    if spec.get("backoffLimit", 0) < 0:
        errors.append(f"{where}: backoffLimit must be >= 0")
    if not spec.get("entrypoint", "").strip():
        errors.append(f"{where}: no entrypoint")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    except yaml.YAMLError as exc:
        errors.append(f"{where}: runtimeEnvYAML is not YAML: {exc}")
    if "rayClusterSpec" in spec:
        errors += cluster_spec_errors(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    return errors


def operator_errors(doc: dict) -> list[str]:
    """What the KubeRay operator refuses at reconcile time beyond the CRD schema."""
    kind, name = doc["kind"], doc["metadata"].get("name", "")
    errors = []
    if not DNS1035.match(name) or len(name) > MAX_NAME.get(kind, 63):
        errors.append(f"metadata.name {name!r}: must be a DNS-1035 label of at most {MAX_NAME.get(kind, 63)} chars")
    spec = doc["spec"]
    if kind == "RayCluster":
        errors += cluster_spec_errors(spec, "spec")
    elif kind == "RayJob":
        errors += rayjob_spec_errors(spec, "spec")
    elif kind == "RayCronJob":
        errors += cron_errors(spec["schedule"])
        if spec.get("timeZone"):
            try:
                zoneinfo.ZoneInfo(spec["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                errors.append(f"spec.timeZone {spec['timeZone']!r} is not an IANA time zone")
        errors += rayjob_spec_errors(spec["jobTemplate"], "spec.jobTemplate")
    return errors


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
    assert schema_errors(doc) == [], f"{name} is refused by the {doc['kind']} CRD schema"
    assert operator_errors(doc) == [], f"{name} would be refused by the KubeRay operator"


def test_rayjobs_on_the_shared_cluster_select_the_raycluster_manifest():
    cluster_name = rendered(CLUSTER / "kuberay" / "raycluster.yaml")["metadata"]["name"]
    for name, doc in manifest_docs():
        if doc["kind"] == "RayJob" and "clusterSelector" in doc["spec"]:
            assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": cluster_name}, name


def corrupt(doc: dict, path: str | tuple, value) -> dict:
    """A deep copy of ``doc`` with ``path`` set to ``value``: dotted, or a tuple for keys with dots."""
    broken = copy.deepcopy(doc)
    parts = path.split(".") if isinstance(path, str) else path
    *parents, leaf = [int(p) if p.isdigit() else p for p in parts]
    node = broken
    for part in parents:
        node = node[part]
    node[leaf] = value
    return broken


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
    ],
    "RayJob": [
        ("spec.activeDeadlineSeconds", "12h"),
        ("spec.entrypoint", ["python", "jobs/train.py"]),
        ("spec.clusterSelecter", {"ray.io/cluster": "emotions"}),
    ],
    "RayCronJob": [
        ("spec.jobTemplate.backoffLimit", "2"),
        ("spec.schedule", 230),
        ("spec.jobTemplate.rayClusterSpec.workerGroupSpecs.0.groupName", None),
        (("spec", "jobTemplate", "rayClusterSpec", "workerGroupSpecs", "0", *POD.split("."), "requests",
          "nvidia.com/gpu"), "one"),  # not a quantity
    ],
}
BROKEN_OPERATOR = {
    "RayCluster": [("metadata.name", "Emotions_Cluster"), ("spec.rayVersion", "2.9.0"),
                   ("spec.workerGroupSpecs.0.minReplicas", 9)],
    "RayJob": [("spec.clusterSelector", {}), ("spec.ttlSecondsAfterFinished", 60),
               ("spec.activeDeadlineSeconds", 0), ("metadata.name", "x" * 48)],
    "RayCronJob": [("spec.schedule", "30 2 * *"), ("spec.schedule", "30 25 * * *"),
                   ("spec.timeZone", "Mars/Olympus_Mons"), ("spec.jobTemplate.shutdownAfterJobFinishes", False)],
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_validation_refuses_broken_copies(kind):
    """Each check above is live: a copy with one mistake is refused, by the named field."""
    name, doc = next((n, d) for n, d in manifest_docs() if d["kind"] == kind)
    assert schema_errors(doc) == [] and operator_errors(doc) == []
    for path, value in BROKEN_SCHEMA[kind]:
        assert schema_errors(corrupt(doc, path, value)), f"{name} with {path}={value!r} passed the {kind} schema"
    for path, value in BROKEN_OPERATOR[kind]:  # schema-valid, refused by the operator
        assert schema_errors(corrupt(doc, path, value)) == []
        assert operator_errors(corrupt(doc, path, value)), f"{name} with {path}={value!r} passed the operator rules"
    missing = copy.deepcopy(doc)
    required = {"RayCluster": "headGroupSpec", "RayJob": None, "RayCronJob": "schedule"}[kind]
    if required:
        del missing["spec"][required]
        assert any("required" in e for e in schema_errors(missing)), f"{kind} without spec.{required} passed"


# ----------------------------------------------------------------------------- images and env


def dockerfile_env() -> dict[str, str]:
    text = (CLUSTER / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    env["WORKDIR"] = re.findall(r"^WORKDIR (\S+)", text, re.M)[-1]
    return env


def containers(spec: dict):
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        yield from group["template"]["spec"]["containers"]


def test_pods_run_the_project_image_from_its_working_directory():
    image, workdir = storage_values()["EMOTIONS_IMAGE"], dockerfile_env()["WORKDIR"]
    for name, doc in manifest_docs():
        spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s.get("rayClusterSpec"),
                "RayCronJob": lambda s: s["jobTemplate"].get("rayClusterSpec")}[doc["kind"]](doc["spec"])  # fmt: skip
        for container in containers(spec) if spec else []:
            assert container["image"] == image, f"{name}: container {container['name']} runs another image"
            assert container.get("workingDir") == workdir, (
                f"{name}: container {container['name']} must start in the Dockerfile's WORKDIR {workdir}, "
                "where `python jobs/X.py` finds the entry points")  # fmt: skip
    assert rendered(LAUNCHER)["docker"]["image"] == image
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", (CLUSTER / "docker" / "Dockerfile").read_text(), re.M)
    import ray

    assert f"rayproject/ray:{ray.__version__}-" in (CLUSTER / "docker" / "Dockerfile").read_text()


def test_docker_context_holds_exactly_what_the_dockerfile_copies():
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
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


def test_launcher_config_validates_against_ray_schema():
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
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert config["available_node_types"]["gpu"]["resources"]["GPU"] >= 1


# ----------------------------------------------------------------------------- entry points

JOB = re.compile(r"^python3?$")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def entrypoints() -> list[tuple[str, str, list[str]]]:
    """(manifest, script, args) for every `python jobs/X.py ...` a manifest runs."""
    found = []
    for name, doc in manifest_docs():
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        if "entrypoint" not in spec:
            continue
        words = shlex.split(spec["entrypoint"])
        assert len(words) >= 2 and JOB.match(words[0]) and re.match(r"^jobs/\w+\.py$", words[1]), (
            f"{name}: entrypoint should be `python jobs/X.py ...`, got {spec['entrypoint']!r}")  # fmt: skip
        found.append((name, words[1], words[2:]))
    return found


@functools.cache
def help_flags(script: str, args: tuple[str, ...] = ()) -> frozenset[str]:
    """The flags ``script --help`` lists. With ``args`` before ``--help``, argparse also parses
    them first, so a bad value (``--actors four``) fails here too."""
    out = subprocess.run([sys.executable, script, *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, f"`python {script} {shlex.join(args)}` is refused:\n{out.stderr}"
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def test_manifests_name_the_expected_entry_points():
    assert sorted({script for _, script, _ in entrypoints()}) == ["jobs/tag_nightly.py", "jobs/train.py",
                                                                 "jobs/tune.py"]  # fmt: skip


@pytest.mark.parametrize("manifest, script, args", entrypoints(), ids=[m for m, _, _ in entrypoints()])
def test_entry_point_accepts_the_manifest_flags_and_overrides(manifest, script, args):
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} does not exist yet (named by {manifest}); its flags are unchecked until it does")
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    unknown = flags - help_flags(script, tuple(args))
    assert not unknown, f"{manifest}: {script} does not accept {sorted(unknown)} (see `python {script} --help`)"

    overrides = [a for a in args if OVERRIDE.match(a)]
    check_config(manifest, script, args, overrides)


def check_config(manifest: str, script: str, args: list[str], overrides: list[str]) -> None:
    """Build the config the job would build, the way its CLI does before Ray starts: a bad key or
    value raises ConfigError naming it."""
    from emotions.config import build_config, from_dict

    if script in ("jobs/train.py", "jobs/tune.py"):
        assert "--preset" in args, f"{manifest}: name the --preset explicitly"
        preset = args[args.index("--preset") + 1]
        if script == "jobs/train.py":
            build_config(preset, overrides=overrides)
        else:
            from emotions.tuning import build_sweep_config, split_tune_settings

            from_dict(split_tune_settings(build_sweep_config(preset, None, overrides))[0])
    else:
        assert not overrides, f"{manifest}: no config checker for the overrides of {script}: {overrides}"


def test_entry_point_checks_refuse_what_the_job_would_refuse():
    from emotions.config import ConfigError

    train_args = next(tuple(args) for _, script, args in entrypoints() if script == "jobs/train.py")
    flags = help_flags("jobs/train.py", train_args)  # cached from the test above
    assert "--output" in flags and "--model" not in flags
    with pytest.raises(AssertionError, match="is refused"):  # a flag given without its value
        help_flags("jobs/train.py", (*train_args, "--ray-address"))
    with pytest.raises(ConfigError, match="storage_pth"):
        check_config("test", "jobs/train.py", ["--preset", "bert-base"], ["run.storage_pth=s3://b/runs"])
    if (ROOT / "jobs" / "tune.py").is_file():
        with pytest.raises(ConfigError, match="num_sample"):
            check_config("test", "jobs/tune.py", ["--preset", "smoke"], ["tune.num_sample=4"])


def test_nightly_tagging_is_date_partitioned_and_never_overwrites():
    cron = next(doc for _, doc in manifest_docs() if doc["kind"] == "RayCronJob")
    template = cron["spec"]["jobTemplate"]
    args = shlex.split(template["entrypoint"])
    values = storage_values()
    assert args[args.index("--input") + 1] == f"{values['EMOTIONS_DUMPS']}/dt={{date}}/"
    assert args[args.index("--output") + 1] == f"{values['EMOTIONS_TAGGED']}/dt={{date}}/"
    assert args[args.index("--model") + 1].startswith(values["EMOTIONS_BUNDLES"] + "/")
    assert "--overwrite" not in args and "--date" not in args  # retries re-run the same, default date
    assert template["shutdownAfterJobFinishes"] is True
    assert template["backoffLimit"] >= 1 and 0 < template["activeDeadlineSeconds"] < 24 * 3600

    # The actor pool fits the GPUs the cluster can scale to (else the job waits forever).
    gpus_per_actor = float(args[args.index("--gpus-per-actor") + 1])
    actors = int(args[args.index("--actors") + 1])
    capacity = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                          .get("nvidia.com/gpu", 0))
                   for g in template["rayClusterSpec"]["workerGroupSpecs"])  # fmt: skip
    assert 0 < actors * gpus_per_actor <= capacity
