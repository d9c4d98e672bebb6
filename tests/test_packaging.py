"""How the package is found: kernels/ and train/ sit at the top of the repository but are the package's
gptoss.kernels and gptoss.train, and Python started in the repository root (python -m pytest, python -c,
a REPL) must still import Hugging Face's `kernels` package, which transformers imports. Each check runs
in a subprocess so that what it imports cannot leak into the rest of the suite."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import package_dirs

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"gptoss": ROOT / "gptoss", **{name.replace(".", "/"): ROOT / d for name, d in package_dirs().items()}}


def test_the_checkout_maps_the_folders_the_wheel_is_built_from():
    # gptoss/__init__.py maps kernels/ and train/ in a checkout; pyproject.toml's package-dir builds the wheel
    from gptoss import MAPPED_FOLDERS

    assert {f"gptoss.{folder}": folder for folder in MAPPED_FOLDERS} == package_dirs()


def run_python(*args: str, cwd: Path, env: dict | None = None) -> dict:
    """Runs `python *args` and returns the JSON object its last line prints."""
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to list the tracked files")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.splitlines() if (ROOT / name).is_file()]


def test_the_top_level_folders_are_not_regular_packages():
    # a regular package (one with __init__.py) in the root shadows any installed package of its name
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not (ROOT / "train" / "__init__.py").exists()


def test_started_in_the_root_transformers_peft_and_kernels_are_the_installed_ones(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    code = (
        "import json, sys\n"
        "import transformers.integrations.hub_kernels, peft, gptoss.kernels.moe, gptoss.train.trainer\n"
        "import kernels\n"
        "print(json.dumps(dict(first=sys.path[0], kernels=getattr(kernels, '__file__', None),\n"
        "    moe=gptoss.kernels.moe.__file__, trainer=gptoss.train.trainer.__file__)))\n"
    )
    (tmp_path / "probe_imports.py").write_text(code)
    as_module = dict(os.environ, PYTHONPATH=str(tmp_path))
    # python -c puts "" (the working folder) first; python -m, as in python -m pytest, the folder's path
    for args, env in ((["-c", code], None), (["-m", "probe_imports"], as_module)):
        found = run_python(*args, cwd=ROOT, env=env)
        assert found["first"] in ("", str(ROOT))  # the root is first on sys.path, as for python -m pytest
        assert Path(found["moe"]) == ROOT / "kernels" / "moe.py"
        assert Path(found["trainer"]) == ROOT / "train" / "trainer.py"
        try:
            installed = metadata.distribution("kernels")
        except metadata.PackageNotFoundError:
            # no Hugging Face kernels here: the root's folder is at most a namespace with no code, which
            # transformers takes for "not installed"
            assert found["kernels"] is None
        else:
            assert found["kernels"] is not None and Path(found["kernels"]).parent != ROOT / "kernels"
            assert Path(found["kernels"]) == Path(installed.locate_file("kernels/__init__.py"))


def test_the_root_on_pythonpath_imports_the_checkout_without_an_install(tmp_path):
    # how benchmarks/run_gpu.sh runs where pip cannot install offline: no editable finder, no .pth file
    site = sysconfig.get_paths()["purelib"]  # this environment's packages; under -S the child cannot know them
    code = (
        "import json, sys\n"
        f"sys.path.append({site!r})  # torch and the rest, but not the editable install (no .pth file is read)\n"
        "import gptoss.kernels.moe, gptoss.train.trainer\n"
        "print(json.dumps(dict(finders=[repr(f) for f in sys.meta_path], moe=gptoss.kernels.moe.__file__,\n"
        "    trainer=gptoss.train.trainer.__file__)))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    found = run_python("-S", "-c", code, cwd=tmp_path, env=env)
    assert not any("editable" in finder.lower() for finder in found["finders"])
    assert Path(found["moe"]) == ROOT / "kernels" / "moe.py"
    assert Path(found["trainer"]) == ROOT / "train" / "trainer.py"


def test_the_wheel_holds_every_module_inside_gptoss_and_imports_from_anywhere(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    for name in tracked_files():  # the wheel is built from what git holds, not from leftovers in the tree
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gptoss-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = set()
    for package, folder in FOLDERS.items():
        expected |= {f"{package}/{path.name}" for path in folder.glob("*.py")}
    expected |= {f"gptoss/csrc/{path.name}" for path in (ROOT / "gptoss" / "csrc").glob("*.[ch]")}
    data = [*(ROOT / "train" / "data").glob("*.jsonl"), ROOT / "train" / "data" / "demo_base.safetensors"]
    expected |= {f"gptoss/train/data/{path.name}" for path in data}  # the demo's rows and its shipped base
    assert expected <= names, sorted(expected - names)
    dist_info = {name.split("/")[0] for name in names if ".dist-info/" in name}
    assert {name.split("/")[0] for name in names} == {"gptoss"} | dist_info  # no top-level kernels/ or train/
    (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")] or [None]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["gptoss"]

    target = tmp_path / "site"
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    code = (
        "import json, gptoss.kernels.moe, gptoss.train.trainer, gptoss.native\n"
        "print(json.dumps(dict(moe=gptoss.kernels.moe.__file__, trainer=gptoss.train.trainer.__file__)))\n"
    )
    found = run_python("-c", code, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)))
    assert Path(found["moe"]) == target / "gptoss" / "kernels" / "moe.py"
    assert Path(found["trainer"]) == target / "gptoss" / "train" / "trainer.py"


def test_bare_pytest_and_python_m_pytest_both_collect_and_pass():
    # bare `pytest` puts its script's folder first on sys.path, `python -m pytest` the working folder: the
    # tests must need neither (they import their helpers as `conftest`, which pytest puts on the path)
    script = Path(sys.executable).with_name("pytest")
    bare = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "pytest"]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    for command in (bare, [sys.executable, "-m", "pytest"]):
        done = subprocess.run(
            [*command, "-q", "-p", "no:cacheprovider", "tests/test_memory.py", "tests/test_config.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}: " + done.stdout[-3000:]
        assert " passed" in done.stdout and "error" not in done.stdout.lower(), done.stdout[-2000:]
