"""The local Kubernetes control plane the chart tests install into (`k8s/local-cluster`).

A real API server, not a fake: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler built from Kubernetes' source by `scripts/k8s-tools`, plus kwok, which plays the
kubelets: it owns a few fake nodes and moves their pods through the lifecycle (scheduled pods
become Ready, Job pods Succeed), so Deployments become Available, StatefulSets Ready and hook
Jobs Complete without any container running. Nothing pulls an image.

What it guarantees:
- Everything listens on loopback only, on free ports chosen at the first start (recorded in
  `cluster.json` in the data folder); TLS everywhere, with a throwaway CA made here, and
  client certificates per component (the admin is in `system:masters`).
- Starting is idempotent: a running cluster of ours is reused; each component is waited for
  (etcd health, the API server's /readyz, the controllers' /healthz, kwok's /healthz, the
  nodes Ready, the `default` service account) against a deadline, and a failure names the
  component and shows the tail of its log.
- Stopping stops our processes by pid, each checked against the data folder on its command
  line, in reverse order; nothing else is signalled.
- Logs: `<data>/logs/<component>.log`. Default data folder: `$GOZON_DATA_DIR/kube`
  (`.gozon/kube`); `--data-dir` or GOZON_KUBE_DIR moves it (the tests use a temporary one).

The cluster also gets what kind would give: a default StorageClass with pre-made volumes, so
the chart's PersistentVolumeClaims bind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack import StackError
from devstack.system import ROOT, PidFile, port_is_free, wait_until

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
NODES = ("kwok-node-a", "kwok-node-b", "kwok-node-c")
ZONES = ("zone-a", "zone-b", "zone-c")
VOLUMES = 12
SERVICE_CIDR = "10.96.0.0/16"
KWOK_SELECTOR = "kwok.x-k8s.io/node=fake"
START_TIMEOUT = float(os.environ.get("GOZON_KUBE_START_TIMEOUT", "180"))


def tools_cache() -> Path:
    return Path(os.environ.get("GOZON_TOOLS_CACHE", Path.home() / ".cache" / "gozon"))


def tools_bin() -> Path:
    return tools_cache() / "bin"


def default_data_dir() -> Path:
    if "GOZON_KUBE_DIR" in os.environ:
        return Path(os.environ["GOZON_KUBE_DIR"]).resolve()
    return Path(os.environ.get("GOZON_DATA_DIR", ROOT / ".gozon")).resolve() / "kube"


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are chosen (a port
    released at once may be handed out again by the next bind)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def issue_cert(pki: Path, name: str, subject: str, extensions: str) -> None:
    """`<name>.key` and `<name>.crt` in `pki`, signed by its `ca.crt`/`ca.key` for ten years,
    with `extensions` (an openssl extfile's text)."""
    (pki / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", subject, cwd=pki,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "3650", "-extfile", f"{name}.ext",
        "-out", f"{name}.crt", cwd=pki,
    )  # fmt: skip


@dataclass
class LocalCluster:
    """One local control plane, owned by its data folder."""

    data_dir: Path
    # the components in start order (a subclass runs others: scripts/kube_node.py)
    components: tuple[str, ...] = field(default=COMPONENTS, init=False)
    # the API server's address: loopback here; a real node needs one its pods can reach
    api_host: str = field(default="127.0.0.1", init=False)
    # one PidFile per component, kept: a process started here is reaped by the stop here
    _pidfiles: dict[str, PidFile] = field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------ layout
    @property
    def pki(self) -> Path:
        return self.data_dir / "pki"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "admin.kubeconfig"

    def _pidfile(self, component: str) -> PidFile:
        if component not in self._pidfiles:
            path = self.data_dir / "run" / f"{component}.pid"
            self._pidfiles[component] = PidFile(path, marker=str(self.data_dir))
        return self._pidfiles[component]

    def _log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    @property
    def ports(self) -> dict[str, int]:
        state = self.data_dir / "cluster.json"
        if state.exists():
            ports: dict[str, int] = json.loads(state.read_text())["ports"]
            return ports
        names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        chosen = dict(zip(names, _free_ports(len(names)), strict=True))
        if "GOZON_KUBE_APISERVER_PORT" in os.environ:
            chosen["apiserver"] = int(os.environ["GOZON_KUBE_APISERVER_PORT"])
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"ports": chosen}, indent=2) + "\n")
        return chosen

    @property
    def server(self) -> str:
        return f"https://{self.api_host}:{self.ports['apiserver']}"

    def _binary(self, name: str) -> str:
        path = tools_bin() / name
        if not path.exists():
            raise StackError(f"{path} is missing: run scripts/k8s-tools first")
        return str(path)

    # ------------------------------------------------------------------ certificates
    def _make_pki(self) -> None:
        """A CA, the serving certificate, and a client certificate per component."""
        if (self.pki / "done").exists():
            return
        self.pki.mkdir(parents=True, exist_ok=True)
        pki = self.pki
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=gozon-local-ca", cwd=pki,
        )  # fmt: skip
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        server_ext = (
            f"subjectAltName=IP:127.0.0.1,IP:{self.api_host},DNS:localhost,IP:10.96.0.1,"
            "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
        )
        client_ext = "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
        certs = {
            "serving": ("/CN=kube-apiserver", server_ext),
            "admin": ("/O=system:masters/CN=gozon-admin", client_ext),
            "controller-manager": ("/CN=system:kube-controller-manager", client_ext),
            "scheduler": ("/CN=system:kube-scheduler", client_ext),
            "apiserver-etcd": ("/CN=kube-apiserver-etcd-client", client_ext),
            **self._extra_certs(client_ext),
        }
        for name, (subject, ext) in certs.items():
            issue_cert(pki, name, subject, ext)
        (pki / "done").write_text("")

    def _extra_certs(self, client_ext: str) -> dict[str, tuple[str, str]]:
        """More client certificates (name: subject, extensions), for a subclass's components."""
        return {}

    def _write_kubeconfig(self, path: Path, user: str) -> None:
        pki = self.pki
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "gozon-local",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate": str(pki / f"{user}.crt"),
                        "client-key": str(pki / f"{user}.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "gozon-local", "context": {"cluster": "gozon-local", "user": user}}
            ],
            "current-context": "gozon-local",
        }
        text = json.dumps(config, indent=2) + "\n"  # JSON is YAML
        # unchanged files are left alone: a running component may watch its file
        if not path.exists() or path.read_text() != text:
            path.write_text(text)

    # ------------------------------------------------------------------ probes
    def _tls(self, client: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if client:
            context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def _get_ok(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _kubectl(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [self._binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    # ------------------------------------------------------------------ components
    def _commands(self) -> dict[str, list[str]]:
        p, pki, d = self.ports, self.pki, self.data_dir
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        kubeconfigs = {c: d / f"{c}.kubeconfig" for c in ("controller-manager", "scheduler")}
        delegated = [
            "--bind-address=127.0.0.1",
            f"--tls-cert-file={pki / 'serving.crt'}",
            f"--tls-private-key-file={pki / 'serving.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--leader-elect=false",
        ]
        return {
            "etcd": [
                self._binary("etcd"),
                "--name=local",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-cluster=local=http://127.0.0.1:{p['etcd-peer']}",
                # a test cluster: losing it in a power cut is fine, fsync on a busy disk is slow
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            "kube-apiserver": [
                self._binary("kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p['apiserver']}",
                # the `kubernetes` Service's endpoints would point at loopback, which the
                # server refuses to publish; nothing in the cluster needs them
                "--endpoint-reconciler-type=none",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'serving.crt'}",
                f"--tls-private-key-file={pki / 'serving.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
            ],
            "kube-controller-manager": [
                self._binary("kube-controller-manager"),
                f"--kubeconfig={kubeconfigs['controller-manager']}",
                f"--authentication-kubeconfig={kubeconfigs['controller-manager']}",
                f"--authorization-kubeconfig={kubeconfigs['controller-manager']}",
                f"--secure-port={p['controller-manager']}",
                *delegated,
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
            ],
            "kube-scheduler": [
                self._binary("kube-scheduler"),
                f"--kubeconfig={kubeconfigs['scheduler']}",
                f"--authentication-kubeconfig={kubeconfigs['scheduler']}",
                f"--authorization-kubeconfig={kubeconfigs['scheduler']}",
                f"--secure-port={p['scheduler']}",
                *delegated,
            ],
            "kwok": [
                self._binary("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={d / 'kwok.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_SELECTOR}",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.240.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{p['kwok']}",
            ],
        }

    def _ready(self, component: str) -> bool:
        p = self.ports
        if component == "etcd":
            return self._get_ok(f"http://127.0.0.1:{p['etcd']}/health")
        if component == "kube-apiserver":
            return self._get_ok(f"{self.server}/readyz", self._tls())
        if component == "kube-controller-manager":
            return self._get_ok(f"https://127.0.0.1:{p['controller-manager']}/healthz", self._tls())
        if component == "kube-scheduler":
            return self._get_ok(f"https://127.0.0.1:{p['scheduler']}/healthz", self._tls())
        return self._get_ok(f"http://127.0.0.1:{p['kwok']}/healthz")

    def _write_kwok_config(self) -> None:
        """kwok's configuration: the node and pod stages shipped in kwok's module."""
        stages = Path(
            os.environ.get("GOZON_KWOK_STAGES", tools_cache() / "kwok" / "stages")
        ).resolve()
        files = sorted(stages.glob("*.yaml"))
        if not files:
            raise StackError(f"no kwok stages in {stages}: run scripts/k8s-tools kwok")
        docs = [f.read_text().strip().removeprefix("---").strip() for f in files]
        (self.data_dir / "kwok.yaml").write_text("\n---\n".join(docs) + "\n")

    def _prepare(self) -> None:
        """Configuration files a subclass's components read (written before any starts)."""
        self._write_kwok_config()

    def _reuse(self) -> None:
        """Runs when start() finds every component running (a subclass re-checks add-ons)."""

    def start(self) -> None:
        running = self.running()
        if running == list(self.components):
            self._reuse()
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state = self.data_dir / "cluster.json"
        if not running and state.exists() and not all(map(port_is_free, self.ports.values())):
            # another program took a port since the last start: choose new ones
            state.unlink()
        self._make_pki()
        self._write_kubeconfig(self.kubeconfig, "admin")
        for component in ("controller-manager", "scheduler"):
            self._write_kubeconfig(self.data_dir / f"{component}.kubeconfig", component)
        self._prepare()
        commands = self._commands()
        for component in self.components:
            pidfile = self._pidfile(component)
            if pidfile.pid() is None:
                pidfile.spawn(commands[component], log=self._log(component))
            wait_until(
                lambda c=component: self._ready(c),  # type: ignore[misc]
                timeout=START_TIMEOUT,
                what=component,
                alive=lambda pf=pidfile: pf.pid() is not None,  # type: ignore[misc]
                log=self._log(component),
            )
        self._seed()

    def _seed(self) -> None:
        """Fake nodes (one per zone), a default StorageClass with volumes; waits for them."""
        objects: list[dict[str, object]] = []
        for name, zone in zip(NODES, ZONES, strict=True):
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {
                            "kwok.x-k8s.io/node": "fake",
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "topology.kubernetes.io/zone": zone,
                            "type": "kwok",
                        },
                    },
                }
            )
        objects.append(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": "standard",
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "kubernetes.io/no-provisioner",
                # as kind's local-path: bound when the pod is scheduled, not before
                "volumeBindingMode": "WaitForFirstConsumer",
                "reclaimPolicy": "Retain",
            }
        )
        for i in range(VOLUMES):
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": f"local-volume-{i:02d}"},
                    "spec": {
                        "capacity": {"storage": "100Gi"},
                        "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": "standard",
                        "hostPath": {"path": f"/var/lib/gozon-kwok/volume-{i:02d}"},
                    },
                }
            )
        self._kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
        )
        self._kubectl(
            "wait", "--for=condition=Ready", "node", *NODES, f"--timeout={START_TIMEOUT:.0f}s"
        )
        wait_until(
            lambda: bool(
                self._kubectl("get", "serviceaccounts", "-n", "default", "-o", "name").strip()
            ),
            timeout=START_TIMEOUT,
            what="the default service account (kube-controller-manager)",
            log=self._log("kube-controller-manager"),
        )

    title = "local cluster"

    def env(self) -> dict[str, str]:
        """What a client needs to reach the cluster (`k8s/local-cluster env`)."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def running(self) -> list[str]:
        return [c for c in self.components if self._pidfile(c).pid() is not None]

    def stop(self) -> list[str]:
        stopped = []
        for component in reversed(self.components):
            if self._pidfile(component).stop(timeout=15):
                stopped.append(component)
        return stopped

    def delete(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def cli(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    cluster: Callable[[Path | None], LocalCluster],
) -> int:
    """`start | stop | status | delete | env` of a cluster (`cluster(--data-dir)` makes it)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("command", choices=["start", "stop", "status", "delete", "env"])
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    local = cluster(args.data_dir)
    try:
        if args.command == "start":
            local.start()
            print(f"{local.title} ready at {local.server}; logs in {local.logs}")
            print(f"export KUBECONFIG={local.kubeconfig}")
        elif args.command == "stop":
            stopped = local.stop()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        elif args.command == "delete":
            local.delete()
            print(f"deleted {local.data_dir}")
        elif args.command == "env":
            for name, value in local.env().items():
                print(f"{name}={value}")
        else:
            up = local.running()
            for component in local.components:
                print(f"{component:<25} {'running' if component in up else 'stopped'}")
            return 0 if up == list(local.components) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(
        argv,
        prog="k8s/local-cluster",
        description=__doc__.split("\n")[0],
        cluster=lambda data_dir: LocalCluster((data_dir or default_data_dir()).resolve()),
    )


if __name__ == "__main__":
    sys.exit(main())
