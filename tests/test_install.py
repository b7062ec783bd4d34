"""The install: our import names are ours alone and resolve into the checkout from any directory, transformers
(which installs HuggingFace's `kernels` package) imports beside them, a wheel holds the kernels as llm.kernels,
and the environment's requirements are consistent. A top-level `kernels` package of ours once made training
crash outside the checkout and every HuggingFace export fail inside it."""

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST = "llm-pretrain"


def our_names() -> list[str]:
    names = metadata.distribution(DIST).read_text("top_level.txt").split()
    assert names == ["llm"]
    return names


def python(code: str, cwd: Path, **env) -> dict:
    """Run code that prints one JSON object in a fresh interpreter started in `cwd`; return the object."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env or None)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_no_other_installed_package_provides_our_import_names():
    provided = metadata.packages_distributions()
    for name in our_names():
        assert {d.lower() for d in provided[name]} == {DIST}, provided[name]


def test_the_checkout_root_offers_no_other_importable_package():
    # with the checkout on sys.path (python -m from its root), a package directory there would shadow one a
    # dependency installs: kernels/ has no __init__.py, so `import kernels` finds HuggingFace's
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")}
    assert packages == set(our_names())
    assert (ROOT / "llm" / "kernels").resolve() == ROOT / "kernels"


@pytest.mark.parametrize("where", ["outside", "checkout"])
def test_our_names_resolve_into_the_checkout_and_transformers_imports_beside_them(where, tmp_path):
    code = """
import json, llm, llm.model.gpt, llm.kernels.attention, llm.kernels.norm, llm.model.hf
import transformers
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.utils.import_utils import is_kernels_available
is_kernels_available()
import transformers.integrations.hub_kernels
try:
    import kernels
    hf_kernels = getattr(kernels, "__file__", None)
except ImportError:
    hf_kernels = None
print(json.dumps({"ours": [llm.__file__, llm.kernels.attention.__file__], "kernels": hf_kernels}))
"""
    seen = python(code, tmp_path if where == "outside" else ROOT)
    assert all(Path(f).is_relative_to(ROOT / "llm") for f in seen["ours"]), seen
    # HuggingFace's package where transformers installed it (without it, our directory is a mere namespace)
    assert seen["kernels"] is None or not Path(seen["kernels"]).is_relative_to(ROOT / "kernels"), seen


@pytest.mark.slow
def test_a_wheel_holds_the_kernels_as_llm_kernels_and_imports_from_anywhere(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, ROOT],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("llm_pretrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llm/kernels/attention.py" in names and "llm/model/gpt.py" in names
    assert {n.split("/")[0] for n in names if not n.startswith("llm_pretrain-")} == {"llm"}
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import json, llm.model.gpt, llm.kernels.attention as a; print(json.dumps({'file': a.__file__}))"
    seen = python(code, tmp_path, PATH="/usr/bin:/bin", PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    assert Path(seen["file"]) == site / "llm" / "kernels" / "attention.py"


def test_the_environments_requirements_are_consistent():
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def check_lock(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools/check_lock.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_check_lock_names_every_difference_from_the_lock(tmp_path):
    # the environment as a fresh process sees it, written as tools/refresh_lock.sh writes a lock (this process
    # may see more: setuptools, once imported, puts the distributions it vendors on sys.path)
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"], capture_output=True, text=True
    ).stdout
    here = dict(line.split("==") for line in freeze.splitlines() if "==" in line and not line.startswith("pip=="))
    lock = tmp_path / "x.lock"
    lock.write_text("# a comment\n" + "".join(f"{n}=={v}\n" for n, v in sorted(here.items())))
    r = check_lock("--lock", lock)
    assert r.returncode == 0 and "matches x.lock (every package)" in r.stdout, r.stdout
    lines = lock.read_text().replace(f"pytest=={here['pytest']}", "pytest==0.0.1") + "not-a-real-package==1.0\n"
    lock.write_text("\n".join(x for x in lines.splitlines() if not x.startswith("numpy==")) + "\n")
    r = check_lock("--lock", lock)
    assert r.returncode == 1 and r.stdout.splitlines() == [
        "not-a-real-package: locked 1.0, not installed",
        f"numpy: {here['numpy']} installed, not in the lock",
        f"pytest: locked 0.0.1, installed {here['pytest']}",
    ], r.stdout
    r = check_lock("--lock", lock, "--overlap")  # on a GPU image: only what both have
    assert r.returncode == 1 and r.stdout.splitlines() == [f"pytest: locked 0.0.1, installed {here['pytest']}"]
    assert check_lock("--lock", lock, "--overlap", "--report").returncode == 0
    lock.write_text("torch>=2\n")
    r = check_lock("--lock", lock)
    assert r.returncode == 2 and r.stderr == f"error: {lock}:1: 'torch>=2' is not name==version\n"


def test_setup_refuses_an_unknown_option_in_one_line():
    r = subprocess.run(["bash", str(ROOT / "tools/setup.sh"), "--unlockd"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == "error: unknown option '--unlockd': run with no option (the lock) or --unlocked\n"


@pytest.mark.slow
def test_refresh_lock_writes_the_newest_versions_only_when_the_tests_pass_on_them(tmp_path):
    # a scratch environment resolved afresh from PyPI (and this machine's PyTorch): about 1.5 minutes; the second
    # refresh reuses it (LOCK_VENV), resolving again but installing nothing new
    lock = tmp_path / "new.lock"
    lock.write_text("untouched\n")

    def refresh(tests: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "LOCK_FILE": str(lock), "LOCK_TESTS": tests, "LOCK_VENV": str(tmp_path / "scratch")}
        return subprocess.run(["bash", str(ROOT / "tools/refresh_lock.sh")], capture_output=True, text=True, env=env)

    # the new environment runs this file's checks (our names, transformers beside them, pip check) first
    r = refresh("python -m pytest -q -p no:cacheprovider -o addopts= tests/test_install.py -k 'names or consistent'")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
    written = lock.read_text()
    lock.write_text("untouched\n")
    r = refresh("python -c 'import llm.model.gpt' && false")
    assert r.returncode != 0 and lock.read_text() == "untouched\n", r.stdout + r.stderr
    text = written
    pins = dict(line.split("==") for line in text.splitlines() if not line.startswith("#"))
    assert "# python: 3." in text and "# platform: Linux" in text
    assert pins["torch"] == metadata.version("torch").split("+")[0]  # the lock's torch, its local label dropped
    for name in ("transformers", "kernels", "deepspeed", "setuptools", "pytest"):
        assert name in pins, name
    assert "pip" not in pins and DIST not in pins


@pytest.mark.slow
def test_gpu_wheels_are_the_locks_versions_for_the_gpu_images_python(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/gpu_wheels.py"), "--out", tmp_path], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    wheels = {}
    for w in tmp_path.glob("*.whl"):
        name, version, *_, python, abi, platform = w.stem.split("-")
        wheels[name.lower().replace("_", "-")] = version
        assert (python, abi) in (("py3", "none"), ("cp312", "cp312")), w.name
        assert platform == "any" or "manylinux" in platform and "x86_64" in platform, w.name
    assert "deepspeed" in wheels and "hydra-core" in wheels and "pydantic-core" in wheels
    assert wheels == {name: lock[name] for name in wheels}
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/gpu_wheels.py"), "--lock", tmp_path / "none"], text=True, capture_output=True
    )
    assert r.returncode == 2 and r.stderr.startswith("error: [Errno 2] No such file or directory")
