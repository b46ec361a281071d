"""The next release's image for the rollout test: docker/Dockerfile built from this checkout
with one more, expand-only migration per service (tests/next_release.py, revision 9001), then
imported into the node's containerd.

The build context is what .dockerignore lets in (the sources, the locks, the downloaded
wheels), with each service's migrations replaced by the next release's, streamed to
`docker build` as a tar. Its tag carries the context's hash: a second run with the same
sources finds the image built and imported and does nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

from scripts.kube_node import NodeCluster
from tests.next_release import SERVICES, next_release_migrations

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_FILES = ("pyproject.toml", "README.md", "requirements/runtime.txt",
                 "requirements/build.txt", "docker/Dockerfile")  # fmt: skip


def _context(next_migrations: dict[str, Path]) -> bytes:
    """The build context as a tar (sorted, zero mtimes: the same sources, the same bytes)."""
    files: dict[str, Path] = {name: ROOT / name for name in CONTEXT_FILES}
    for path in sorted((ROOT / "docker" / "wheels").glob("*.whl")):
        files[f"docker/wheels/{path.name}"] = path
    replaced = {SERVICES / service / "migrations": folder for service, folder in
                next_migrations.items()}  # fmt: skip
    for path in sorted(SERVICES.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        if any(path.is_relative_to(old) for old in replaced):
            continue
        files[str(path.relative_to(ROOT))] = path
    for old, new in replaced.items():
        for path in sorted(new.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[str(old.relative_to(ROOT) / path.relative_to(new))] = path
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in sorted(files):
            data = files[name].read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _run(*cmd: str, stdin: bytes | None = None, timeout: float = 1800) -> str:
    env = dict(os.environ)
    if (
        cmd[:2] == ("docker", "build")
        and subprocess.run(
            ["docker", "buildx", "version"], capture_output=True, check=False
        ).returncode
    ):
        env["DOCKER_BUILDKIT"] = "0"  # the classic builder, as docker/build-image falls back
    done = subprocess.run(list(cmd), input=stdin, capture_output=True, timeout=timeout,
                          check=False, env=env)  # fmt: skip
    if done.returncode != 0:
        said = (done.stdout.decode() + done.stderr.decode())[-3000:]
        raise AssertionError(f"{' '.join(cmd[:3])} failed: {said}")
    return done.stdout.decode()


def next_image(node: NodeCluster, current: str) -> str:
    """Builds (once) and imports the next release's image; its name. `current` is today's
    image: the next one is built on the same base image, with the same version."""
    template = (
        '{{ index .Config.Labels "org.opencontainers.image.base.name" }} '
        '{{ index .Config.Labels "org.opencontainers.image.version" }}'
    )
    base, version = _run("docker", "image", "inspect", "-f", template, current).split()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {s: next_release_migrations(s, Path(tmp)) for s in ("orders", "payments")}
        context = _context(folders)
    digest = hashlib.sha256(context + base.encode()).hexdigest()[:12]
    name = f"gozon:{version}-next-{digest}"
    built = subprocess.run(["docker", "image", "inspect", name], capture_output=True,
                           check=False).returncode == 0  # fmt: skip
    if not built:
        _run("docker", "build", "--network", "none", "-f", "docker/Dockerfile", "-t", name,
             "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"VERSION={version}",
             "--build-arg", "REVISION=next-release", "-", stdin=context)  # fmt: skip
    if not node.has_image(f"docker.io/library/{name}"):
        archive = subprocess.run(["docker", "save", name], capture_output=True, check=True,
                                 timeout=600).stdout  # fmt: skip
        node.load_image(archive)
    return name
