"""The Docker images, checked without a Docker engine: hadolint runs in CI; here, that they fit the repo."""

import re
import tomllib

import pytest

from tests.helpers import REPO

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.name for d in DOCKERFILES])
def test_dockerfile_matches_the_repository(dockerfile):
    text = dockerfile.read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), (
                f"{dockerfile.name} copies {source}, which is not in the repository"
            )
            assert not re.search(rf"^{re.escape(source)}$", (REPO / ".dockerignore").read_text(), flags=re.M)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, flags=re.M).group(1)
    assert entrypoint in scripts
    config = re.search(r'"--config", "([^"]+)"', text).group(1)
    assert (REPO / config).is_file()
    assert 'VOLUME ["/data", "/workspace/runs"]' in text and "TSA_DATA_DIR=/data" in text


def test_both_images_exist():
    assert [d.name for d in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    assert "torch" in (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert "pytorch/pytorch" in (REPO / "docker" / "Dockerfile.cuda").read_text()
