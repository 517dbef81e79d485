"""Disk size of the cluster image (cluster/docker/Dockerfile), layer by layer, and the node root volume it needs.

The image cannot be built here (no Docker, no Docker Hub, no download.pytorch.org), so each layer is
sized from its recipe, as close to a measurement as this machine allows:

0. base ``rayproject/ray:2.60.0-py311-cu128``: Ray builds it FROM ``nvidia/cuda:12.8.1-cudnn-devel``
   (ray-project/ray: .buildkite/_images.rayci.yml, docker/base-deps/cuda.wanda.yaml), adds apt tools,
   Miniforge with Python 3.11, Ray's base dependencies and ``ray[all]``. No published size of that tag
   is reachable from here: an estimate from published sizes of its parts (BASE_* below, with sources)
   plus the ray[train,data,tune,default] closure measured in this venv.
1. ``pip install torch==2.13.0 --index-url .../whl/cu128``: the wheels, read on PyPI with HTTP Range
   requests (the zip's end-of-central-directory record, then the central directory: every file's
   compressed and uncompressed size, without downloading the wheel). The 2.13.0+cu128 wheel itself is
   only on download.pytorch.org; PyPI's newest CUDA 12.8 build of torch stands in for it
   (TORCH_PROXY; PyPI's torch 2.11+ are CUDA 13 builds). The CUDA 12 wheels are those 2.13.0+cu128
   pins (cuda_pins()). torch's pure-Python dependencies and the .pyc files pip compiles for torch are
   measured in this venv (its CPU torch has the same Python files).
2. the project's other dependencies (pyproject.toml): their closure as installed in this venv (each
   distribution's RECORD), less torch's closure (layer 1) and less ray[...]'s closure (in the base).
3. bert-base-uncased in the Hugging Face cache: the hub's file sizes (BERT_FILES, with sources).
4. the package and the entry points: this checkout's files.

Uncompressed = on-disk size after unpacking (each file rounded up to 4 KiB blocks). Compressed = what a
registry layer holds: gzip (level 6, as Docker/BuildKit) of the files measured here; the wheels' own
deflate sizes for wheels. A node needs both during a pull: containerd keeps the compressed blobs in its
content store and unpacks them into snapshots; the blobs are dropped after the pull only with the CRI
option ``discard_unpacked_layers = true`` (containerd's default is false; EKS's AL2023 nodeadm sets it).

    python benchmarks/image_size.py        # needs https://pypi.org and https://files.pythonhosted.org

Prints the layer table, the totals and the recommended root volume per node type, and writes
benchmarks/results/image_size.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import io
import json
import math
import struct
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "image_size.json"
PYPI_JSON = "https://pypi.org/pypi/{}/json"
BLOCK = 4096
GB = 1e9
GIB = 2**30

# --- what the recipe installs -------------------------------------------------------------------------
TORCH_VERSION = "2.13.0"  # cluster/docker/Dockerfile TORCH_VERSION
# PyPI's default Linux torch is a CUDA build; 2.10.0 is its newest CUDA 12.8 one (2.11.0 onwards pin
# cuda-toolkit 13.x). Checked at run time against the wheel's METADATA.
TORCH_PROXY = "2.10.0"
# torch 2.11.0+cu128's METADATA (download.pytorch.org/whl/cu128), as quoted from a real install in a public
# repo's test (code search, file id 68861095903): cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,
# cusolver,cusparse,nvjitlink,nvrtc,nvtx]==12.8.1, nvidia-cusparselt-cu12==0.7.1, cuda-bindings>=12.9.4,<13,
# nvidia-cudnn-cu12==9.19.0.56, nvidia-nccl-cu12==2.28.9, nvidia-nvshmem-cu12==3.4.5, triton==3.6.0. The
# last four equal the CUDA 13 build's pins of the same release (PyPI torch 2.11.0 METADATA), so for
# 2.13.0+cu128 they are read from PyPI's torch 2.13.0 (CUDA 13) METADATA and renamed -cu13 -> -cu12.
CUDA_TOOLKIT = "12.8.1"
CUDA_TOOLKIT_EXTRAS = "cublas cudart cufft cufile cupti curand cusolver cusparse nvjitlink nvrtc nvtx".split()
FIXED_CU12_PINS = {"nvidia-cusparselt-cu12": "==0.7.1", "cuda-bindings": ">=12.9.4,<13"}
FOLLOW_TORCH_PINS = ("nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-nvshmem-cu13", "triton")
EXTRA_WHEELS = {"cuda-pathfinder": "~=1.1"}  # cuda-bindings 12.9.x: Requires-Dist cuda-pathfinder~=1.1

# bert-base-uncased as AutoTokenizer/AutoModel.from_pretrained fetch it (safetensors, not the .bin).
BERT_FILES = {
    "model.safetensors": 440_449_768,
    "config.json": 570,
    "vocab.txt": 231_508,
    "tokenizer.json": 466_062,
    "tokenizer_config.json": 48,
}
BERT_SOURCE = (
    "google-bert/bert-base-uncased hub sizes: model.safetensors 440,449,768 B (sha256 68d45e23..., revision "
    "86b5e09, pinned in public repos: code search ids 68749277042, 65791483554); config 570, vocab 231,508, "
    "tokenizer.json 466,062 (id 4584751571). 440,473,133 B is pytorch_model.bin (id 6724820831), not fetched."
)

# --- the base image: published sizes of its parts (an estimate, not a measurement) ---------------------
BASE_CUDA_UNCOMPRESSED = 10.5 * GB
BASE_CUDA_SOURCE = (
    "nvidia/cuda:12.8.0-cudnn-devel-ubuntu22.04 = 10.5 GB in a published `podman images` listing (code search "
    "id 51929483461; for scale nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 = 7.91 GB, id 41765766338). "
    "Compressed: x the deflate ratio measured on the CUDA 12.8 wheels (same libraries)."
)
# Miniforge + Python 3.11, ray[all]'s extras beyond the ones measured here (serve, rllib, ...), Ray's base
# dependency lock (cloud SDKs) and apt tools: an allowance, not measured.
BASE_RAY_ALLOWANCE = 1.0 * GB
BASE_RAY_CROSSCHECK = (
    "cross-check: rayproject/ray:2.46.0 (CPU: Ubuntu + the same Ray stack) = 845 MB compressed in `crictl "
    "images` (id 61443218271); rayproject/ray:2.9.3-py310 = 2.2 GB uncompressed in `docker images` "
    "(id 39449989595)"
)

CROSS_CHECK = (
    "rayproject/ray-llm:2.52.0-py311-cu128 (the same CUDA 12.8 cudnn-devel base, Ray, torch cu128, plus vLLM) = "
    "11.6 GB compressed in `crictl images`, and its pull grew a kind node's disk by ~20 GB (published lab "
    "notes, code search id 65905991194)"
)
SOURCES = {
    "ray_base_image": "ray-project/ray: .buildkite/_images.rayci.yml (cu12.8.1-cudnn), docker/base-deps/cuda.wanda."
    "yaml (FROM nvidia/cuda:$CUDA_VERSION-devel-ubuntu24.04), docker/base-deps/Dockerfile (Miniforge, Python, "
    "python/deplocks/base_deps lock), docker/ray/Dockerfile (pip install ray[all])",
    "containerd_pull": "containerd stores a pulled image twice, compressed blobs in the content store and unpacked "
    "snapshots (docker/docs PR #24496; deckhouse/deckhouse PR #4843); it unpacks every layer before any cleanup, "
    "so a 12 GB image needed 24 GB (containerd/containerd#4249). The CRI option discard_unpacked_layers lets GC "
    "drop the blobs after unpacking (containerd/containerd#5879); containerd's default is false (`containerd "
    "config default` in awslabs/amazon-eks-ami PR #1360), EKS AMIs set it true since that PR, as does AL2023 "
    "nodeadm (nodeadm/internal/containerd/config*.template.toml)",
    "karpenter_default_volume": "20Gi gp3 root volume (aws/karpenter-provider-aws pkg/providers/amifamily DefaultEBS)",
    "kubelet": "EKS nodeadm kubelet config: kubeReserved ephemeral-storage 1Gi, evictionHard nodefs.available 10% "
    "(awslabs/amazon-eks-ami nodeadm/internal/kubelet/config.go); kubelet defaults: imagefs.available<15%, "
    "imageGCHighThresholdPercent 85 (kubernetes.io node-pressure eviction, kubelet config reference)",
    "cross_check": CROSS_CHECK,
}

# --- node sizing ---------------------------------------------------------------------------------------
OS_SYSTEM = 10 * GIB  # assumption: AMI OS + NVIDIA driver/toolkit + system DaemonSet images + logs
KUBE_RESERVED = 1 * GIB  # EKS nodeadm kubeReserved ephemeral-storage 1Gi (amazon-eks-ami kubelet/config.go)
USAGE_CEILING = 0.85
CEILING_SOURCE = (
    "keep disk use <= 85%: kubelet imageGCHighThresholdPercent default 85 (image GC starts above it); "
    "hard eviction nodefs.available<10% (kubelet default and EKS nodeadm evictionHard) and the kubelet "
    "default imagefs.available<15% (kubernetes.io node-pressure eviction)"
)
INSTANCES = {"g5.12xlarge": (48, 192, 4)}  # AWS EC2 specs: vCPU, GiB memory, NVIDIA A10G GPUs


class Unreachable(RuntimeError):
    pass


# --- HTTP, PyPI, wheels --------------------------------------------------------------------------------
def _get(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    headers = {"User-Agent": "emotions-image-size"}
    if byte_range:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
            if byte_range and resp.status != 206:
                raise Unreachable(f"{url}: no HTTP Range support (status {resp.status}); not downloading it whole")
            return resp.read()
    except urllib.error.HTTPError as err:
        raise Unreachable(f"{url}: HTTP {err.code}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise Unreachable(f"{url}: {err}") from err


_projects: dict[str, dict] = {}


def pypi(name: str) -> dict:
    if name not in _projects:
        url = PYPI_JSON.format(name)
        data = json.loads(_get(url))
        for files in data["releases"].values():
            for f in files:
                f["url"] = urllib.parse.urljoin(url, f["url"])
        _projects[name] = data
    return _projects[name]


def _platform_ok(tag) -> bool:
    if tag.interpreter not in {"cp311", "py3", "py311"} or tag.abi not in {"cp311", "abi3", "none"}:
        return False
    plat = tag.platform
    if plat == "any" or plat in {"manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"}:
        return True
    if plat.startswith("manylinux_") and plat.endswith("_x86_64"):
        return int(plat.split("_")[2]) <= 35  # glibc of the Ubuntu 22.04/24.04 bases is >= 2.35
    return False


def wheel_for(name: str, spec: str) -> dict:
    """The newest release of ``name`` in ``spec`` with a wheel for CPython 3.11 on Linux x86-64."""
    releases = pypi(name)["releases"]
    specifier = SpecifierSet(spec)
    candidates = []
    for key, files in releases.items():
        try:
            version = Version(key)
        except InvalidVersion:
            continue
        if files and specifier.contains(version):
            candidates.append((version, files))
    for version, files in sorted(candidates, key=lambda c: c[0], reverse=True):
        wheels = []
        for f in files:
            try:
                _, _, build, tags = parse_wheel_filename(f["filename"])
            except InvalidWheelFilename:
                continue
            if any(_platform_ok(t) for t in tags):
                wheels.append((build, f))
        if wheels:
            f = max(wheels, key=lambda w: w[0])[1]  # pip prefers the highest build tag
            return {
                "name": name,
                "version": str(version),
                "filename": f["filename"],
                "url": f["url"],
                "size": f["size"],
            }
    raise Unreachable(f"no cp311 Linux x86-64 wheel of {name}{spec} on PyPI")


_listings: dict[str, list[tuple[str, int, int, int]]] = {}


def zip_entries(url: str, size: int) -> list[tuple[str, int, int, int]]:
    """(name, compressed, uncompressed, local header offset) of every file, from the central directory
    (read once per URL: the torch wheel's is wanted for its METADATA and for its sizes)."""
    if url not in _listings:
        _listings[url] = _central_directory(url, size)
    return _listings[url]


def _central_directory(url: str, size: int) -> list[tuple[str, int, int, int]]:
    tail_len = min(size, 22 + 65535 + 20)
    tail = _get(url, (size - tail_len, size - 1))
    eocd = tail.rfind(b"PK\x05\x06")
    if eocd < 0:
        raise Unreachable(f"{url}: no zip end-of-central-directory record")
    count, cd_size, cd_offset = struct.unpack("<HII", tail[eocd + 10 : eocd + 20])
    if 0xFFFFFFFF in (cd_size, cd_offset) or count == 0xFFFF:  # zip64: the locator sits just before
        loc = tail[eocd - 20 : eocd]
        if loc[:4] != b"PK\x06\x07":
            raise Unreachable(f"{url}: zip64 locator missing")
        (z64_offset,) = struct.unpack("<Q", loc[8:16])
        rec = _get(url, (z64_offset, z64_offset + 55))
        count, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
    cd = _get(url, (cd_offset, cd_offset + cd_size - 1))
    entries, pos = [], 0
    while pos + 46 <= len(cd) and cd[pos : pos + 4] == b"PK\x01\x02":
        csize, usize, nlen, elen, clen = struct.unpack("<IIHHH", cd[pos + 20 : pos + 34])
        (offset,) = struct.unpack("<I", cd[pos + 42 : pos + 46])
        name = cd[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        extra, epos = cd[pos + 46 + nlen : pos + 46 + nlen + elen], 0
        while epos + 4 <= len(extra):
            hid, hlen = struct.unpack("<HH", extra[epos : epos + 4])
            if hid == 1:  # zip64 extended information, fields present only where the 32-bit one is 0xFFFFFFFF
                vals, k = extra[epos + 4 : epos + 4 + hlen], 0
                if usize == 0xFFFFFFFF:
                    (usize,), k = struct.unpack("<Q", vals[k : k + 8]), k + 8
                if csize == 0xFFFFFFFF:
                    (csize,), k = struct.unpack("<Q", vals[k : k + 8]), k + 8
                if offset == 0xFFFFFFFF:
                    (offset,) = struct.unpack("<Q", vals[k : k + 8])
            epos += 4 + hlen
        entries.append((name, csize, usize, offset))
        pos += 46 + nlen + elen + clen
    if len(entries) != count:
        raise Unreachable(f"{url}: read {len(entries)} central directory entries, expected {count}")
    return entries


def zip_read(url: str, entry: tuple[str, int, int, int]) -> bytes:
    name, csize, _, offset = entry
    header = _get(url, (offset, offset + 29))
    method = struct.unpack("<H", header[8:10])[0]
    nlen, elen = struct.unpack("<HH", header[26:30])
    start = offset + 30 + nlen + elen
    data = _get(url, (start, start + csize - 1)) if csize else b""
    return zlib.decompress(data, -15) if method == 8 else data


def wheel_requires(wheel: dict) -> list[str]:
    entries = zip_entries(wheel["url"], wheel["size"])
    meta = next(e for e in entries if e[0].endswith(".dist-info/METADATA"))
    text = zip_read(wheel["url"], meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def measure_wheel(wheel: dict) -> dict:
    entries = zip_entries(wheel["url"], wheel["size"])
    return {
        **wheel,
        "files": len(entries),
        "compressed": sum(e[1] for e in entries),
        "uncompressed": sum(math.ceil(e[2] / BLOCK) * BLOCK for e in entries),
        "apparent": sum(e[2] for e in entries),
    }


def cuda_pins() -> tuple[dict[str, str], dict]:
    """The CUDA 12 wheels torch 2.13.0+cu128 installs: name -> version specifier."""
    pins = dict(FIXED_CU12_PINS)
    pins["cuda-toolkit"] = f"=={CUDA_TOOLKIT}"
    torch_cu13 = wheel_for("torch", f"=={TORCH_VERSION}")
    followed = {}
    for line in wheel_requires(torch_cu13):
        req = Requirement(line)
        if req.name in FOLLOW_TORCH_PINS and not (req.marker and "extra" in str(req.marker)):
            pins[req.name.replace("-cu13", "-cu12")] = str(req.specifier)
            followed[req.name] = str(req.specifier)
    missing = [n for n in FOLLOW_TORCH_PINS if n not in followed]
    if missing:
        raise Unreachable(f"torch {TORCH_VERSION} METADATA on PyPI lacks {missing}: update FOLLOW_TORCH_PINS")
    toolkit = wheel_for("cuda-toolkit", f"=={CUDA_TOOLKIT}")
    for line in wheel_requires(toolkit):
        req = Requirement(line)
        if req.marker and any(req.marker.evaluate({"extra": e}) for e in CUDA_TOOLKIT_EXTRAS):
            pins[req.name] = str(req.specifier)
    pins.update(EXTRA_WHEELS)
    return pins, {"torch_cu13_pins_followed": followed, "cuda_toolkit": CUDA_TOOLKIT}


# --- this venv -----------------------------------------------------------------------------------------
def _dists() -> dict[str, md.Distribution]:
    out: dict[str, md.Distribution] = {}
    for d in md.distributions():
        out.setdefault(canonicalize_name(d.metadata["Name"]), d)
    return out


def closure(roots: list[str], dists: dict[str, md.Distribution]) -> tuple[set[str], set[str]]:
    """Distributions the requirements ``roots`` install here (markers evaluated for this Python), and the missing."""
    seen: dict[str, set[str]] = {}
    missing: set[str] = set()
    stack = [(Requirement(r), {""}) for r in roots]
    while stack:
        req, parent_extras = stack.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        name = canonicalize_name(req.name)
        if name not in dists:
            missing.add(name)
            continue
        extras = {canonicalize_name(e) for e in req.extras}
        new = extras - seen.get(name, set())
        if name in seen and not new:
            continue
        evaluate = new if name in seen else {""} | extras
        seen.setdefault(name, set()).update(extras)
        stack.extend((Requirement(r), evaluate) for r in dists[name].requires or [])
    return set(seen), missing


def dist_paths(dist: md.Distribution) -> list[Path]:
    out = []
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            out.append(p)
    return out


class _Counter(io.RawIOBase):
    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)


def measure_files(paths: list[Path], gzip: bool = True) -> dict:
    """On-disk size (4 KiB blocks) and, with ``gzip``, the gzip'ed tar size (level 6, Docker's default)."""
    sink = _Counter()
    on_disk = apparent = 0
    tar = tarfile.open(fileobj=sink, mode="w:gz", compresslevel=6) if gzip else None
    for p in paths:
        size = p.stat().st_size
        apparent += size
        on_disk += math.ceil(size / BLOCK) * BLOCK
        if tar:
            tar.add(p, arcname=str(p).lstrip("/"), recursive=False)
    if tar:
        tar.close()
    return {"files": len(paths), "uncompressed": on_disk, "apparent": apparent, "compressed": sink.n if gzip else None}


def gzip_ratio_fp32_weights() -> float:
    """gzip ratio of float32 weights drawn like BERT's (N(0, 0.02)): safetensors barely compress."""
    data = np.random.default_rng(0).normal(0, 0.02, 4 * 2**20).astype(np.float32).tobytes()
    return len(zlib.compress(data, 6)) / len(data)


# --- manifests -----------------------------------------------------------------------------------------
def _quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for suffix, factor in units.items():
        if str(text).endswith(suffix):
            return int(float(str(text)[: -len(suffix)]) * factor)
    return int(text)


def pod_requests() -> list[dict]:
    """Every Ray container's requests in cluster/kuberay/*.yaml: file, group, role, ephemeral-storage, GPUs."""
    rows = []

    def walk(node, path, group):
        if isinstance(node, dict):
            group = node.get("groupName", group)
            for key, value in node.items():
                if key == "containers" and isinstance(value, list):
                    for c in value:
                        req = (c.get("resources") or {}).get("requests") or {}
                        role = "head" if "headGroupSpec" in path else "worker"
                        rows.append(
                            {
                                "group": "head" if role == "head" else group,
                                "role": role,
                                "ephemeral_storage": _quantity(req.get("ephemeral-storage", 0)),
                                "gpus": int(req.get("nvidia.com/gpu", 0)),
                                "cpu": float(req.get("cpu", 0)),
                                "memory": _quantity(req.get("memory", 0)),
                            }
                        )
                else:
                    walk(value, path + (key,), group)
        elif isinstance(node, list):
            for item in node:
                walk(item, path, group)

    for f in sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            before = len(rows)
            walk(doc, (), None)
            for r in rows[before:]:
                r["file"] = str(f.relative_to(ROOT))
    return rows


def launcher_volumes() -> dict[str, int]:
    cfg = yaml.safe_load((ROOT / "cluster" / "launcher" / "aws-gpu.yaml").read_text())
    out = {}
    for name, node in (cfg.get("available_node_types") or {}).items():
        for bdm in node.get("node_config", {}).get("BlockDeviceMappings", []):
            out[name] = bdm.get("Ebs", {}).get("VolumeSize")
    return out


# --- main ----------------------------------------------------------------------------------------------
def _row(layer: str, compressed: float, uncompressed: float, source: str, **extra) -> dict:
    return {"layer": layer, "compressed": int(compressed), "uncompressed": int(uncompressed), "source": source, **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.time()

    dists = _dists()
    if "ray" not in dists or "transformers" not in dists:
        sys.exit("run this in the project's venv (ray and transformers must be installed: pip install -e .)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_reqs = [r for r in project if canonicalize_name(Requirement(r).name) == "ray"]
    all_deps, missing = closure(project, dists)
    ray_set, _ = closure(ray_reqs, dists)
    torch_set, _ = closure(["torch"], dists)

    # Layer 1: torch (CUDA build) + its CUDA 12 wheels from PyPI.
    try:
        pins, pin_info = cuda_pins()
        torch_proxy = wheel_for("torch", f"=={TORCH_PROXY}")
        proxy_requires = wheel_requires(torch_proxy)
        if not any("cuda-runtime-cu12==12.8" in r for r in proxy_requires):
            raise Unreachable(f"PyPI torch {TORCH_PROXY} is not a CUDA 12.8 build: update TORCH_PROXY")
        wheels = [torch_proxy] + [wheel_for(n, s) for n, s in sorted(pins.items())]
        with ThreadPoolExecutor(8) as pool:
            measured = list(pool.map(measure_wheel, wheels))
    except Unreachable as err:
        print(
            f"PyPI unreachable or changed: {err}\nThis script reads wheel sizes from https://pypi.org and "
            "https://files.pythonhosted.org (HTTP Range requests); run it where those answer.",
            file=sys.stderr,
        )
        return 2
    torch_dist = dists["torch"]
    torch_pyc = measure_files([p for p in dist_paths(torch_dist) if "__pycache__" in p.parts])
    torch_py_deps = sorted(torch_set - {"torch"} - ray_set)
    torch_deps_local = measure_files([p for n in torch_py_deps for p in dist_paths(dists[n])])
    cuda_wheels = [w for w in measured if w["name"] != "torch"]
    cuda_ratio = sum(w["compressed"] for w in cuda_wheels) / sum(w["apparent"] for w in cuda_wheels)

    # Layer 2: the project's other dependencies.
    other = sorted(all_deps - torch_set - ray_set - {"emotions"})
    per_dist = {n: measure_files(dist_paths(dists[n])) for n in other}
    other_total = {k: sum(v[k] for v in per_dist.values()) for k in ("compressed", "uncompressed", "files")}
    ray_measured = measure_files([p for n in sorted(ray_set) for p in dist_paths(dists[n])], gzip=False)

    # Layer 0: the base image (estimate).
    base_cuda = {"uncompressed": BASE_CUDA_UNCOMPRESSED, "compressed": BASE_CUDA_UNCOMPRESSED * cuda_ratio}
    python_ratio = other_total["compressed"] / other_total["uncompressed"]  # gzip ratio of installed Python dists
    base_ray = {
        "uncompressed": ray_measured["uncompressed"] + BASE_RAY_ALLOWANCE,
        "compressed": (ray_measured["uncompressed"] + BASE_RAY_ALLOWANCE) * python_ratio,
    }

    # Layer 3: bert-base-uncased; layer 4: the code.
    bert_bytes = sum(BERT_FILES.values())
    bert_disk = sum(math.ceil(b / BLOCK) * BLOCK for b in BERT_FILES.values())
    weights_ratio = gzip_ratio_fp32_weights()
    src = [ROOT / "pyproject.toml", ROOT / "README.md"]
    for top in ("emotions", "jobs"):
        src += [p for p in sorted((ROOT / top).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    code = measure_files([p for p in src if p.exists()])

    torch_w = measured[0]
    layers = [
        _row(
            "0a base: nvidia/cuda 12.8 cudnn-devel",
            base_cuda["compressed"],
            base_cuda["uncompressed"],
            "ESTIMATE. " + BASE_CUDA_SOURCE,
        ),
        _row(
            "0b base: Ray 2.60 stack (conda Python, ray[all])",
            base_ray["compressed"],
            base_ray["uncompressed"],
            f"ESTIMATE: ray[...] closure measured here ({len(ray_set)} dists, "
            f"{ray_measured['uncompressed'] / GB:.2f} GB) + {BASE_RAY_ALLOWANCE / GB:.1f} GB allowance "
            f"(Miniforge/Python, other ray[all] extras, base deps, apt); compressed: x{python_ratio:.2f}, layer 2's "
            f"gzip ratio. {BASE_RAY_CROSSCHECK}",
        ),
        _row(
            f"1a torch {TORCH_VERSION}+cu128 wheel",
            torch_w["compressed"] + torch_pyc["compressed"],
            torch_w["uncompressed"] + torch_pyc["uncompressed"],
            f"PROXY: PyPI {torch_w['filename']} (CUDA 12.8 build; zip central directory) + its .pyc "
            f"({torch_pyc['uncompressed'] / GB:.2f} GB, from this venv's torch)",
        ),
        _row(
            "1b CUDA 12 wheels (cuBLAS, cuDNN, NCCL, triton, ...)",
            sum(w["compressed"] for w in cuda_wheels),
            sum(w["uncompressed"] for w in cuda_wheels),
            f"PyPI wheels at torch {TORCH_VERSION}+cu128's pins (zip central directories): "
            + ", ".join(f"{w['name']} {w['version']}" for w in cuda_wheels),
        ),
        _row(
            "1c torch's Python deps not in the base",
            torch_deps_local["compressed"],
            torch_deps_local["uncompressed"],
            "measured in this venv (RECORD files, tar.gz): " + ", ".join(torch_py_deps),
        ),
        _row(
            "2 project dependencies (pip install -r)",
            other_total["compressed"],
            other_total["uncompressed"],
            f"measured in this venv: {len(other)} dists in pyproject's closure, less torch's and ray[...]'s",
        ),
        _row(
            "3 bert-base-uncased (HF cache)",
            bert_bytes * weights_ratio,
            bert_disk,
            BERT_SOURCE + f" Compressed: x{weights_ratio:.3f}, gzip of N(0, 0.02) float32 (assumption).",
        ),
        _row(
            "4 package + entry points (COPY, pip install .)",
            code["compressed"] * 3,
            code["uncompressed"] * 3,
            "this checkout's emotions/, jobs/, pyproject, README (tar.gz); x3: the copy, setuptools' build/ "
            "copy and site-packages (with .pyc)",
        ),
    ]
    total_c = sum(r["compressed"] for r in layers)
    total_u = sum(r["uncompressed"] for r in layers)
    added_c = sum(r["compressed"] for r in layers[2:])
    added_u = sum(r["uncompressed"] for r in layers[2:])

    # Node volumes: per node type, the pods it hosts (their ephemeral-storage requests from cluster/kuberay).
    pods = pod_requests()

    def largest(pred) -> dict | None:
        chosen = [p for p in pods if pred(p)]
        return max(chosen, key=lambda p: p["ephemeral_storage"]) if chosen else None

    head = largest(lambda p: p["role"] == "head")
    gpu1 = largest(lambda p: p["role"] == "worker" and p["gpus"] == 1)
    gpu4 = largest(lambda p: p["role"] == "worker" and p["gpus"] >= 2)
    cpu = largest(lambda p: p["role"] == "worker" and not p["gpus"])
    big_cpu, big_mem, big_gpus = INSTANCES["g5.12xlarge"]
    node_pods = [
        ("head node (CPU, e.g. m6i.2xlarge): the head pod", [head]),
        ("1-GPU worker node (g5.2xlarge): one 1-GPU pod", [gpu1]),
        ("CPU worker node (m6i.2xlarge): one cpu-group pod", [cpu]),
    ]
    if gpu4:
        node_pods.append((f"4-GPU node (g5.12xlarge): one {gpu4['gpus']}-GPU pod ({gpu4['file']})", [gpu4]))
    if gpu1:
        packed = min(big_gpus, int(big_cpu // max(gpu1["cpu"], 1)), int(big_mem * GIB // max(gpu1["memory"], 1)))
        node_pods.append((f"4-GPU node (g5.12xlarge): {packed} 1-GPU pods packed", [gpu1] * packed))
    peak = total_c + total_u
    nodes = []
    for label, hosted in node_pods:
        if None in hosted:
            continue
        requests = [p["ephemeral_storage"] for p in hosted]
        need = OS_SYSTEM + KUBE_RESERVED + peak + sum(requests)
        volume = math.ceil(need / USAGE_CEILING / GIB / 10) * 10
        nodes.append(
            {
                "node": label,
                "pod_ephemeral_requests_gib": [r / GIB for r in requests],
                "pod_groups": sorted({f"{p['file']}:{p['group']}" for p in hosted}),
                "needed_gib": round(need / GIB, 1),
                "recommended_root_volume_gib": volume,
                "steady_state_free_gib": round(volume - (OS_SYSTEM + total_u + sum(requests)) / GIB, 1),
            }
        )

    print(f"{'layer':<52} {'compressed MB':>14} {'uncompressed MB':>16}  source")
    for r in layers:
        print(f"{r['layer']:<52} {r['compressed'] / 1e6:>14,.0f} {r['uncompressed'] / 1e6:>16,.0f}  {r['source']}")
    print(f"{'total image':<52} {total_c / 1e6:>14,.0f} {total_u / 1e6:>16,.0f}")
    print(f"{'  of which the Dockerfile adds (layers 1-4)':<52} {added_c / 1e6:>14,.0f} {added_u / 1e6:>16,.0f}")
    print(f"pull peak on a node (compressed blobs + unpacked snapshots): {peak / GIB:.1f} GiB")
    print(f"cross-check: {CROSS_CHECK}")
    print("\nPod ephemeral-storage requests (cluster/kuberay):")
    for p in pods:
        print(f"  {p['file']:<44} {p['group']:<6} {p['gpus']} GPU  {p['ephemeral_storage'] / GIB:4.0f} GiB")
    print(
        f"Root volume = (OS/system {OS_SYSTEM / GIB:.0f} GiB [assumption] + kubeReserved {KUBE_RESERVED / GIB:.0f} "
        f"GiB + image pull peak {peak / GIB:.1f} GiB + pod requests) / {USAGE_CEILING} ({CEILING_SOURCE})"
    )
    for n in nodes:
        print(f"  {n['node']:<78} needs {n['needed_gib']:6.1f} GiB -> {n['recommended_root_volume_gib']} GiB")
    print(f"ray up (cluster/launcher/aws-gpu.yaml) VolumeSize: {launcher_volumes()}")
    if missing:
        print(f"not installed here, not counted: {sorted(missing)}")

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "image": "cluster/docker/Dockerfile: rayproject/ray:2.60.0-py311-cu128 + torch 2.13.0 (cu128) + deps + bert",
        "units": "bytes; uncompressed = on-disk (4 KiB blocks); compressed = gzip/deflate",
        "layers": layers,
        "total": {"compressed": total_c, "uncompressed": total_u, "pull_peak": peak},
        "added_by_dockerfile": {"compressed": added_c, "uncompressed": added_u},
        "wheels": [
            {k: w[k] for k in ("name", "version", "filename", "size", "files", "compressed", "uncompressed")}
            for w in measured
        ],
        "torch_pins": {**pin_info, "cuda12_pins": pins, "torch_proxy": TORCH_PROXY},
        "project_dependencies": {n: per_dist[n] for n in other},
        "ray_closure_measured": {"dists": sorted(ray_set), **ray_measured},
        "not_installed_here": sorted(missing),
        "pods": pods,
        "nodes": nodes,
        "launcher_volume_gib": launcher_volumes(),
        "assumptions": {
            "os_system_gib": OS_SYSTEM / GIB,
            "kube_reserved_ephemeral_gib": KUBE_RESERVED / GIB,
            "usage_ceiling": USAGE_CEILING,
            "ceiling_source": CEILING_SOURCE,
            "pull_peak": "compressed + uncompressed: containerd keeps the compressed blobs (content store) and the "
            "unpacked snapshots; discard_unpacked_layers=true (EKS AL2023 nodeadm default) drops the blobs only "
            "after the pull",
        },
        "sources": SOURCES,
        "seconds": round(time.time() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
