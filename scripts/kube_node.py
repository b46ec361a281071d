"""A real one-node Kubernetes on this machine (`k8s/node-cluster`): pods run in containers.

The control plane of `scripts/kube_cluster.py` (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) without kwok, plus the node: Debian's containerd as the CRI runtime, Debian's
CNI plugins (a bridge network), the kubelet and kube-proxy built from the same Kubernetes
module as the control plane, and CoreDNS as the cluster DNS. The binaries come from
`scripts/k8s-tools --node`; the two images the node itself needs (the pod sandbox's `pause`
and CoreDNS) are one-file images made here from those binaries and imported into containerd.
Nothing is pulled from an image registry: images are imported (`load_image`, or
`docker save … | ctr -n k8s.io images import -`).

What it guarantees:
- The node has an address that is not loopback, so that the API server can reach the
  kubelet (`kubectl logs/exec/port-forward`) and pods can reach the API server: NODE_IP on a
  port-less bridge device of its own (NODE_DEVICE; this machine's kernel has no `dummy`
  device), made at start and removed by `delete`. The API server listens on that address.
- containerd runs with `restrict_oom_score_adj = true` (this VM refuses negative
  oom_score_adj, and runc fails without it), its own socket, root and state folders, apart
  from the Docker engine's containerd.
- The kubelet: cgroupfs driver, cgroup v1 allowed, no QoS cgroups (the VM does not delegate
  them), x509 + webhook authentication and authorization; the API server reaches it with a
  client certificate of `system:masters`.
- The CNI chain: bridge (with host-local IPAM), firewall (the pods' traffic accepted in FORWARD,
  whatever the policy: the Docker engine's is DROP), portmap.
- A pod's packet to a Service address that kube-proxy did not translate (no endpoint at that
  instant) is refused at once by a routing rule (`ip rule … unreachable`), never sent out by
  the host's default route (kube-proxy's own REJECT is behind the CNI firewall's ACCEPT).
- kube-proxy in iptables mode; `net.bridge.bridge-nf-call-iptables` is set, so traffic
  between pods on the bridge goes through its rules (a Service's answer is un-NATed).
- Starting is idempotent and each component is waited for: etcd, the API server, the
  controllers as in the control plane, containerd (`ctr version`), the kubelet's /healthz,
  kube-proxy's /healthz, the Node Ready, CoreDNS's Deployment Available, the `default`
  service account.
- Stopping stops our processes by pid, in reverse order; before containerd stops, the
  containers it still runs are killed (so no shim outlives the node), and after it what the
  kubelet left mounted under the data folder is unmounted. `delete` also unmounts what
  containerd left mounted, removes kube-proxy's
  iptables rules, the bridges, and the data folder.
- Logs: `<data>/logs/<component>.log`. Default data folder `$GOZON_DATA_DIR/kube-node`
  (`.gozon/kube-node`); `--data-dir` or GOZON_KUBE_NODE_DIR moves it.

- Storage: rancher's local-path-provisioner as a process of the node (the admin's
  kubeconfig), behind the default StorageClass `local-path` (WaitForFirstConsumer, reclaim
  Delete): a claim gets a hostPath volume, a folder under `<data>/volumes` made mode 0777 by a
  helper pod running `local-path-helper` (k8s/node/local-path-helper.c, a one-file image made
  here), and removed by the same helper when the claim is deleted.

- Resource metrics: metrics-server as a process of the node, registered as the API service
  `v1beta1.metrics.k8s.io` (the API server's aggregation layer: a front-proxy client
  certificate, requestheader authentication, routing to the endpoint at NODE_IP), reading the
  kubelet's /metrics/resource with the admin's certificate. The HPA controller's downscale
  stabilization is HPA_DOWNSCALE_STABILIZATION (60 s; Kubernetes' default is 5 minutes).

- NetworkPolicies: kube-router's firewall alone (`--run-firewall`, no routing, no service
  proxy) as a process of the node, with the admin's kubeconfig: it enforces
  `networking.k8s.io/v1` policies (ingress and egress) for the node's pods with iptables and
  ipset (this machine's kernel has no nftables `queue` expression, which kube-network-policies
  needs). A pod no policy selects is open; traffic from the node itself (the kubelet's probes,
  the tests' connections) is always admitted.
- `stop` removes what the node added to the host's firewall and routing for its pods:
  kube-router's chains and ipsets and the Service routing rule, once their processes have
  stopped (the next start makes them again). kube-proxy's own chains stay until `delete`, which
  also removes the node's devices and folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack import StackError
from devstack.system import ROOT, wait_until
from scripts.kube_cluster import (
    SERVICE_CIDR,
    LocalCluster,
    cli,
    issue_cert,
    tools_bin,
    tools_cache,
)

NODE_COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
    "local-path-provisioner",
    "metrics-server",
    "kube-router",
)
NODE_NAME = "gozon-node"
NODE_DEVICE = "gozon-node0"
NODE_IP = os.environ.get("GOZON_KUBE_NODE_IP", "10.250.0.1")
CNI_BRIDGE = "gozon-cni0"
POD_CIDR = os.environ.get("GOZON_KUBE_POD_CIDR", "10.244.0.0/24")
CLUSTER_DNS = "10.96.0.10"
STORAGE_CLASS = "local-path"  # the default StorageClass (rancher's local-path-provisioner)
PROVISIONER = "rancher.io/local-path"
# a test node: an HPA scales in one minute after the load has gone, not five
HPA_DOWNSCALE_STABILIZATION = os.environ.get("GOZON_KUBE_HPA_DOWNSCALE", "60s")
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
SERVICE_RULE_PRIORITY = 3210
SERVICE_ROUTE_RULE = f"{SERVICE_RULE_PRIORITY}:\tfrom all to {SERVICE_CIDR} iif {CNI_BRIDGE}"
NODE_PORTS = (
    "kubelet", "kubelet-healthz", "proxy-healthz", "proxy-metrics", "metrics-server",
    "kube-router-health",
)  # fmt: skip
# what kube-router's firewall makes: its chains in the filter table, its ipsets
KUBE_ROUTER_CHAINS = ("KUBE-ROUTER-", "KUBE-NWPLCY-", "KUBE-POD-FW-")
KUBE_ROUTER_IPSETS = ("KUBE-SRC-", "KUBE-DST-", "inet6:KUBE-SRC-", "inet6:KUBE-DST-")
START_TIMEOUT = float(os.environ.get("GOZON_KUBE_START_TIMEOUT", "300"))
IMAGE_NAMESPACE = "k8s.io"  # containerd's namespace for the CRI


def default_node_dir() -> Path:
    if "GOZON_KUBE_NODE_DIR" in os.environ:
        return Path(os.environ["GOZON_KUBE_NODE_DIR"]).resolve()
    return Path(os.environ.get("GOZON_DATA_DIR", ROOT / ".gozon")).resolve() / "kube-node"


def _run(*cmd: str, stdin: bytes | None = None, check: bool = True) -> str:
    done = subprocess.run(list(cmd), input=stdin, capture_output=True, check=False)
    if check and done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise StackError(f"{' '.join(cmd[:4])} … failed: {err}")
    return done.stdout.decode(errors="replace")


def kube_router_cleanup(rules: str) -> list[list[str]]:
    """The iptables arguments that remove kube-router's chains, given `iptables -S`'s output.

    The jumps to its chains from the others first, then its chains flushed (they jump to each
    other), then deleted. (`kube-router --cleanup-config` is no substitute: in v2.1.0 it
    cleans nothing of the firewall's and flushes every IPVS service of the host.)
    """
    jumps: list[list[str]] = []
    chains: list[str] = []
    for line in rules.splitlines():
        words = shlex.split(line)
        if len(words) < 2:
            continue
        if words[0] == "-N" and words[1].startswith(KUBE_ROUTER_CHAINS):
            chains.append(words[1])
        elif words[0] == "-A" and not words[1].startswith(KUBE_ROUTER_CHAINS):
            targets = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g")]
            if any(t.startswith(KUBE_ROUTER_CHAINS) for t in targets):
                jumps.append(["-D", *words[1:]])
    return jumps + [["-F", c] for c in chains] + [["-X", c] for c in chains]


def _write(path: Path, text: str) -> bool:
    """Writes a file only when its content changes (kube-proxy exits when its configuration
    file is written to, even with the same content); True when it did."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        return True
    return False


def one_file_image(binary: Path, name: str, entrypoint: Sequence[str]) -> bytes:
    """A `docker save` archive of an image holding one static binary at /<its name>.

    containerd's `ctr images import` reads this format; building it here needs no Docker
    engine and no base image.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tar.gettarinfo(str(binary), arcname=binary.name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with binary.open("rb") as f:
            tar.addfile(info, f)
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Entrypoint": list(entrypoint), "User": "0"},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        }
    ).encode()
    config_id = hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        [{"Config": f"{config_id}.json", "RepoTags": [name], "Layers": [f"{diff_id}/layer.tar"]}]
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path, data in (
            (f"{diff_id}/layer.tar", layer_bytes),
            (f"{config_id}.json", config),
            ("manifest.json", manifest),
        ):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class NodeCluster(LocalCluster):
    """The control plane plus one real node, owned by its data folder."""

    components: tuple[str, ...] = field(default=NODE_COMPONENTS, init=False)
    api_host: str = field(default=NODE_IP, init=False)
    # components whose configuration file _prepare changed (restarted by a start that reuses)
    _changed: set[str] = field(default_factory=set, init=False, repr=False)

    # ------------------------------------------------------------------ layout
    @property
    def containerd_socket(self) -> Path:
        return self.data_dir / "containerd" / "containerd.sock"

    @property
    def containerd_state(self) -> Path:
        # containerd's state folder holds sockets: short, and on a tmpfs like /run/containerd
        tag = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path("/run/gozon-containerd") / tag

    @property
    def node_ports(self) -> dict[str, int]:
        state = self.data_dir / "node.json"
        from scripts.kube_cluster import _free_ports

        if state.exists():
            ports: dict[str, int] = json.loads(state.read_text())["ports"]
            added = [name for name in NODE_PORTS if name not in ports]
            if added:  # a data folder from before metrics-server or kube-router
                ports.update(zip(added, _free_ports(len(added)), strict=True))
                state.write_text(json.dumps({"ports": ports}, indent=2) + "\n")
            return ports

        names = NODE_PORTS
        chosen = dict(zip(names, _free_ports(len(names)), strict=True))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"ports": chosen}, indent=2) + "\n")
        return chosen

    @property
    def pause_image(self) -> str:
        version = (tools_cache() / "pause.version").read_text().strip()
        return f"gozon.local/pause:{version}"

    @property
    def coredns_image(self) -> str:
        version = os.environ.get("GOZON_COREDNS_VERSION", "v1.15.0")
        return f"gozon.local/coredns:{version}"

    @property
    def local_path_helper_image(self) -> str:
        """Named by the helper binary's hash: a changed helper is a new image."""
        digest = hashlib.sha256((tools_bin() / "local-path-helper").read_bytes()).hexdigest()
        return f"gozon.local/local-path-helper:{digest[:12]}"

    @property
    def volumes(self) -> Path:
        """Where the provisioner makes the volumes' folders."""
        return self.data_dir / "volumes"

    def ctr(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        """Debian's `ctr` against our containerd, in the CRI's namespace."""
        return _run(
            "ctr", "--address", str(self.containerd_socket), "-n", IMAGE_NAMESPACE, *args,
            stdin=stdin, check=check,
        )  # fmt: skip

    # ------------------------------------------------------------------ certificates
    def _extra_certs(self, client_ext: str) -> dict[str, tuple[str, str]]:
        return {
            "kubelet": (f"/O=system:nodes/CN=system:node:{NODE_NAME}", client_ext),
            "kube-proxy": ("/CN=system:kube-proxy", client_ext),
            # the API server's identity towards the kubelet (logs, exec, port-forward)
            "apiserver-kubelet": ("/O=system:masters/CN=kube-apiserver-kubelet-client", client_ext),
            # the API server's identity towards an aggregated API server (metrics-server)
            "front-proxy-client": ("/CN=front-proxy-client", client_ext),
        }

    def _make_pki(self) -> None:
        """The certificates; one added to _extra_certs after the data folder was made is made
        now, with the same CA."""
        super()._make_pki()
        pki = self.pki
        ext = "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
        for name, (subject, extensions) in self._extra_certs(ext).items():
            if (pki / f"{name}.crt").exists():
                continue
            issue_cert(pki, name, subject, extensions)

    # ------------------------------------------------------------------ host network
    def _ensure_network(self) -> None:
        """The node's address on a port-less bridge (a dummy device), and IP forwarding."""
        links = _run("ip", "-o", "link", "show")
        if f": {NODE_DEVICE}:" not in links and f": {NODE_DEVICE}@" not in links:
            _run("ip", "link", "add", NODE_DEVICE, "type", "bridge")
        addrs = _run("ip", "-o", "-4", "addr", "show", "dev", NODE_DEVICE)
        if f" {NODE_IP}/" not in addrs:
            _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_DEVICE)
        _run("ip", "link", "set", NODE_DEVICE, "up")
        for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
            path = Path("/proc/sys") / key
            if path.exists() and path.read_text().strip() != "1":
                path.write_text("1\n")
        # A pod's packet to a Service address that kube-proxy did not translate (the Service
        # had no endpoint at that instant) is refused here, at once. Without this rule it
        # left by the host's default route: kube-proxy's REJECT for such a Service sits in
        # FORWARD behind the CNI firewall plugin's ACCEPT of the pods' traffic, and on this
        # machine an egress proxy beyond the default route accepts any connection and answers
        # any HTTP request with an empty 404, which the gateway then pooled and kept reusing.
        if SERVICE_ROUTE_RULE not in _run("ip", "rule", "show"):
            _run("ip", "rule", "add", "iif", CNI_BRIDGE, "to", SERVICE_CIDR, "priority",
                 str(SERVICE_RULE_PRIORITY), "unreachable")  # fmt: skip

    # ------------------------------------------------------------------ configuration
    def _cni_bin_dir(self) -> str:
        for d in CNI_BIN_DIRS:
            if (Path(d) / "bridge").exists():
                return d
        raise StackError(
            "the CNI plugins are missing (no bridge in "
            f"{' or '.join(CNI_BIN_DIRS)}): apt-get install containernetworking-plugins"
        )

    def _prepare(self) -> None:
        for binary in ("containerd", "ctr", "runc", "iptables", "ipset"):
            if shutil.which(binary) is None:
                raise StackError(
                    f"{binary} is missing: apt-get install containerd runc iptables ipset "
                    "containernetworking-plugins"
                )
        for name in (
            "kubelet", "kube-proxy", "pause", "coredns", "local-path-provisioner",
            "local-path-helper", "kube-router",
        ):  # fmt: skip
            self._binary(name)
        self._ensure_network()
        d = self.data_dir
        cni = d / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "gozon",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": CNI_BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(cni / "ipam"),
                    },
                },
                # accepts the pods' traffic in the FORWARD chain: with the bridge's traffic
                # going through iptables, the Docker engine's `FORWARD DROP` policy would
                # otherwise drop new pod-to-pod connections
                {"type": "firewall", "backend": "iptables"},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        _write(cni / "net.d" / "10-gozon.conflist", json.dumps(conflist, indent=2) + "\n")
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "containerd").mkdir(parents=True, exist_ok=True)
        if _write(
            d / "containerd" / "config.toml",
            f"""# Written by scripts/kube_node.py.
version = 2
root = "{d / "containerd" / "root"}"
state = "{self.containerd_state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{self.containerd_socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[{cri}]
  sandbox_image = "{self.pause_image}"
  # this VM refuses a negative oom_score_adj; runc fails ("can't get final child's PID from
  # pipe") unless containerd keeps the scores at or above its own
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{self._cni_bin_dir()}"
    conf_dir = "{cni / "net.d"}"
""",
        ):
            self._changed.add("containerd")
        self._write_kubeconfig(d / "kubelet.kubeconfig", "kubelet")
        self._write_kubeconfig(d / "kube-proxy.kubeconfig", "kube-proxy")
        p = self.node_ports
        pki = self.pki
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": p["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": p["kubelet-healthz"],
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": "cluster.local",
            "resolvConf": str(self._resolv_conf()),
            "failSwapOn": False,
            "serializeImagePulls": False,
            "maxPods": 110,
            # a shared machine's disk: evict only when it is really full
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "2%",
                "imagefs.available": "2%",
            },
            "imageGCHighThresholdPercent": 98,
            "imageGCLowThresholdPercent": 95,
            "tlsCertFile": str(pki / "serving.crt"),
            "tlsPrivateKeyFile": str(pki / "serving.key"),
        }
        if _write(d / "kubelet.yaml", json.dumps(kubelet, indent=2) + "\n"):
            self._changed.add("kubelet")
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(d / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"127.0.0.1:{p['proxy-healthz']}",
            "metricsBindAddress": f"127.0.0.1:{p['proxy-metrics']}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # no masqueradeAll: the bridge's traffic goes through iptables
            # (bridge-nf-call-iptables), so replies between pods on the bridge are un-NATed,
            # and a server sees its clients' pod addresses
            "iptables": {"masqueradeAll": False},
            # leave the host's conntrack table sizes alone
            "conntrack": {"maxPerCore": 0},
        }
        if _write(d / "kube-proxy.yaml", json.dumps(proxy, indent=2) + "\n"):
            self._changed.add("kube-proxy")
        self._prepare_local_path()

    def _prepare_local_path(self) -> None:
        """The provisioner's configuration and its helper pod's template."""
        d = self.data_dir / "local-path"
        d.mkdir(parents=True, exist_ok=True)
        self.volumes.mkdir(parents=True, exist_ok=True)
        config = {
            "nodePathMap": [
                {"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(self.volumes)]}
            ],
            # the helper image has no shell: its one binary is the command
            "setupCommand": "/local-path-helper",
            "teardownCommand": "/local-path-helper",
            "cmdTimeoutSeconds": 300,
        }
        helper_pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "helper-pod"},
            "spec": {
                "priorityClassName": "system-node-critical",
                "containers": [
                    {
                        "name": "helper-pod",
                        "image": self.local_path_helper_image,
                        "imagePullPolicy": "Never",
                    }
                ],
            },
        }
        changed = _write(d / "config.json", json.dumps(config, indent=2) + "\n")
        changed |= _write(d / "helper-pod.yaml", json.dumps(helper_pod, indent=2) + "\n")
        if changed:
            self._changed.add("local-path-provisioner")

    def _resolv_conf(self) -> Path:
        """The host's resolv.conf without loopback name servers (they do not answer in a pod,
        and CoreDNS would forward to itself)."""
        lines = []
        with contextlib.suppress(OSError):
            for line in Path("/etc/resolv.conf").read_text().splitlines():
                words = line.split()
                if words[:1] == ["nameserver"] and (
                    words[1].startswith("127.") or words[1] == "::1"
                ):
                    continue
                lines.append(line)
        path = self.data_dir / "resolv.conf"
        if _write(path, "\n".join(lines) + "\n"):
            self._changed.add("kubelet")
        return path

    def _commands(self) -> dict[str, list[str]]:
        commands = super()._commands()
        del commands["kwok"]
        pki, d = self.pki, self.data_dir
        api = commands["kube-apiserver"]
        api[:] = [
            a
            for a in api
            if not a.startswith(
                ("--bind-address", "--advertise-address", "--endpoint-reconciler-type",
                 "--authorization-mode")
            )
        ]  # fmt: skip
        api += [
            f"--bind-address={NODE_IP}",
            f"--advertise-address={NODE_IP}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            # the aggregation layer (metrics-server): who the API server is towards it, and
            # whose forwarded identities it accepts
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--requestheader-client-ca-file={pki / 'ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            "--enable-aggregator-routing=true",
        ]
        commands["kube-controller-manager"].append(
            f"--horizontal-pod-autoscaler-downscale-stabilization={HPA_DOWNSCALE_STABILIZATION}"
        )
        commands["containerd"] = ["containerd", f"--config={d / 'containerd' / 'config.toml'}"]
        commands["kubelet"] = [
            self._binary("kubelet"),
            f"--config={d / 'kubelet.yaml'}",
            f"--kubeconfig={d / 'kubelet.kubeconfig'}",
            f"--root-dir={d / 'kubelet'}",
            f"--cert-dir={d / 'kubelet' / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--node-labels=topology.kubernetes.io/zone=zone-a,gozon.local/node=real",
            "--v=1",
        ]
        commands["kube-proxy"] = [self._binary("kube-proxy"), f"--config={d / 'kube-proxy.yaml'}"]
        commands["local-path-provisioner"] = [
            self._binary("local-path-provisioner"),
            "start",
            f"--config={d / 'local-path' / 'config.json'}",
            f"--helper-pod-file={d / 'local-path' / 'helper-pod.yaml'}",
            f"--provisioner-name={PROVISIONER}",
            "--namespace=kube-system",
            "--service-account-name=local-path-provisioner",
            "--configmap-name=local-path-config",
            f"--helper-image={self.local_path_helper_image}",
            f"--kubeconfig={self.kubeconfig}",
        ]
        commands["metrics-server"] = [
            self._binary("metrics-server"),
            f"--bind-address={NODE_IP}",
            f"--secure-port={self.node_ports['metrics-server']}",
            f"--cert-dir={d / 'metrics-server'}",
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            # the kubelet's serving certificate is its own self-signed one
            "--kubelet-insecure-tls",
            "--kubelet-preferred-address-types=InternalIP",
            "--kubelet-use-node-status-port",
            "--metric-resolution=15s",
        ]
        commands["kube-router"] = [
            self._binary("kube-router"),
            # the NetworkPolicy firewall only: the bridge CNI, kube-proxy and the node's routes
            # stay as they are
            "--run-firewall=true",
            "--run-router=false",
            "--run-service-proxy=false",
            "--enable-cni=false",
            f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--health-port={self.node_ports['kube-router-health']}",
            "--metrics-port=0",
            "--v=1",
        ]
        return commands

    def _ready(self, component: str) -> bool:
        p = self.node_ports
        if component == "containerd":
            if not self.containerd_socket.exists():
                return False
            try:
                self.ctr("version")
            except StackError:
                return False
            self._import_node_images()
            return True
        if component == "kubelet":
            # and its Node registered: kube-router, started after it, reads the Node at start
            return (
                self._get_ok(f"http://127.0.0.1:{p['kubelet-healthz']}/healthz")
                and self._node_registered()
            )
        if component == "kube-proxy":
            return self._get_ok(f"http://127.0.0.1:{p['proxy-healthz']}/livez")
        if component == "local-path-provisioner":
            return True  # no health endpoint; `alive` catches one that exits
        if component == "metrics-server":
            insecure = ssl.create_default_context()
            insecure.check_hostname = False
            insecure.verify_mode = ssl.CERT_NONE  # its own self-signed serving certificate
            return self._get_ok(f"https://{NODE_IP}:{p['metrics-server']}/livez", insecure)
        if component == "kube-router":
            # 200 once the firewall has synced its rules
            return self._get_ok(f"http://127.0.0.1:{p['kube-router-health']}/healthz")
        return super()._ready(component)

    def _node_registered(self) -> bool:
        try:
            return bool(self._kubectl("get", "node", NODE_NAME, "-o", "name").strip())
        except StackError:
            return False

    # ------------------------------------------------------------------ images
    def has_image(self, name: str) -> bool:
        return any(line.split()[:1] == [name] for line in self.ctr("images", "ls").splitlines())

    def load_image(self, archive: bytes) -> str:
        """Imports a `docker save` archive into the node's containerd; returns ctr's output."""
        return self.ctr("images", "import", "-", stdin=archive)

    def _import_node_images(self) -> None:
        bin_dir = tools_bin()
        for name, binary, entry in (
            (self.pause_image, bin_dir / "pause", ["/pause"]),
            (self.coredns_image, bin_dir / "coredns", ["/coredns"]),
            (self.local_path_helper_image, bin_dir / "local-path-helper", ["/local-path-helper"]),
        ):
            if not self.has_image(name):
                self.ctr("images", "import", "-", stdin=one_file_image(binary, name, entry))

    # ------------------------------------------------------------------ cluster add-ons
    def _reuse(self) -> None:
        self._changed.clear()
        self._prepare()  # the bridge device may be gone (a reboot keeps no link)
        if self._changed:
            # a component whose configuration changed is restarted with it
            for component in self._changed:
                self._pidfile(component).stop(timeout=20)
            self.start()
        else:
            self._seed()

    def _seed(self) -> None:
        """Waits for the node, then runs CoreDNS (the `kube-dns` Service at CLUSTER_DNS), the
        default StorageClass and the metrics API; waits for them."""
        self._kubectl(
            "wait", "--for=condition=Ready", f"node/{NODE_NAME}", f"--timeout={START_TIMEOUT:.0f}s"
        )
        for objects in (
            self._coredns_objects(), self._storage_objects(), self._metrics_objects()
        ):  # fmt: skip
            self._kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                          stdin=json.dumps(objects))  # fmt: skip
        self._kubectl(
            "-n", "kube-system", "rollout", "status", "deployment/coredns",
            f"--timeout={START_TIMEOUT:.0f}s",
        )  # fmt: skip
        self._kubectl(
            "wait", "--for=condition=Available", "apiservice/v1beta1.metrics.k8s.io",
            f"--timeout={START_TIMEOUT:.0f}s",
        )  # fmt: skip
        wait_until(
            lambda: bool(
                self._kubectl("get", "serviceaccounts", "-n", "default", "-o", "name").strip()
            ),
            timeout=START_TIMEOUT,
            what="the default service account (kube-controller-manager)",
            log=self._log("kube-controller-manager"),
        )

    def _coredns_objects(self) -> dict[str, object]:
        labels = {"k8s-app": "kube-dns"}
        corefile = (
            ".:53 {\n"
            "    errors\n"
            "    health {\n"
            "        lameduck 5s\n"
            "    }\n"
            "    ready\n"
            "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n"
            "        pods insecure\n"
            "        fallthrough in-addr.arpa ip6.arpa\n"
            "        ttl 30\n"
            "    }\n"
            "    forward . /etc/resolv.conf\n"
            "    cache 30\n"
            "    loop\n"
            "    reload\n"
            "}\n"
        )
        meta = {"namespace": "kube-system"}
        items: list[dict[str, object]] = [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {**meta, "name": "coredns"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "system:coredns"},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["endpoints", "services", "pods", "namespaces"],
                        "verbs": ["list", "watch"],
                    },
                    {
                        "apiGroups": ["discovery.k8s.io"],
                        "resources": ["endpointslices"],
                        "verbs": ["list", "watch"],
                    },
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "system:coredns"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "system:coredns",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}
                ],
            },
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {**meta, "name": "coredns"},
                "data": {"Corefile": corefile},
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {**meta, "name": "coredns", "labels": labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "serviceAccountName": "coredns",
                            "dnsPolicy": "Default",
                            "priorityClassName": "system-cluster-critical",
                            "containers": [
                                {
                                    "name": "coredns",
                                    "image": self.coredns_image,
                                    "imagePullPolicy": "Never",
                                    "args": ["-conf", "/etc/coredns/Corefile"],
                                    "ports": [
                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                        {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                    ],
                                    "volumeMounts": [
                                        {"name": "config", "mountPath": "/etc/coredns"}
                                    ],
                                    "livenessProbe": {
                                        "httpGet": {"path": "/health", "port": 8080},
                                        "periodSeconds": 10,
                                        "failureThreshold": 5,
                                    },
                                    "readinessProbe": {
                                        "httpGet": {"path": "/ready", "port": 8181},
                                        "periodSeconds": 2,
                                    },
                                    "resources": {
                                        "requests": {"cpu": "50m", "memory": "50Mi"},
                                        "limits": {"memory": "170Mi"},
                                    },
                                }
                            ],
                            "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {**meta, "name": "kube-dns", "labels": labels},
                "spec": {
                    "clusterIP": CLUSTER_DNS,
                    "selector": labels,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                    ],
                },
            },
        ]
        return {"apiVersion": "v1", "kind": "List", "items": items}

    @staticmethod
    def _storage_objects() -> dict[str, object]:
        """The provisioner's ServiceAccount (its helper pods run as it) and the default
        StorageClass."""
        items: list[dict[str, object]] = [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"namespace": "kube-system", "name": "local-path-provisioner"},
                "automountServiceAccountToken": False,
            },
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": STORAGE_CLASS,
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": PROVISIONER,
                "volumeBindingMode": "WaitForFirstConsumer",
                "reclaimPolicy": "Delete",
            },
        ]
        return {"apiVersion": "v1", "kind": "List", "items": items}

    def _metrics_objects(self) -> dict[str, object]:
        """metrics-server, a process at NODE_IP, as the API service v1beta1.metrics.k8s.io: a
        Service without selector and its Endpoints (the API server routes to the endpoint)."""
        meta = {"namespace": "kube-system", "name": "metrics-server"}
        port = self.node_ports["metrics-server"]
        items: list[dict[str, object]] = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]},
            },
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": meta,
                "subsets": [
                    {"addresses": [{"ip": NODE_IP}], "ports": [{"name": "https", "port": port}]}
                ],
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": "v1beta1.metrics.k8s.io"},
                "spec": {
                    "group": "metrics.k8s.io",
                    "version": "v1beta1",
                    "service": {"namespace": "kube-system", "name": "metrics-server", "port": 443},
                    # its serving certificate is self-signed (a test node)
                    "insecureSkipTLSVerify": True,
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                },
            },
        ]
        return {"apiVersion": "v1", "kind": "List", "items": items}

    title = "one-node cluster"

    def env(self) -> dict[str, str]:
        return {**super().env(), "CONTAINERD_ADDRESS": str(self.containerd_socket)}

    # ------------------------------------------------------------------ stop, delete
    def stop(self) -> list[str]:
        stopped = []
        for component in reversed(self.components):
            if component == "containerd" and self._pidfile(component).pid() is not None:
                self._kill_containers()
            if self._pidfile(component).stop(timeout=20):
                stopped.append(component)
        if not any(self._pidfile(c).pid() is not None for c in ("kubelet", "containerd")):
            # The kubelet's own bind mount and the pods' volume mounts outlive it: unmounted
            # here, so that a stopped node leaves nothing mounted (a CI clone's folder can then
            # be removed); the next start mounts what its pods need again.
            self._unmount_under(self.data_dir)
            # no pod left: the Service routing rule goes
            _run("ip", "rule", "del", "priority", str(SERVICE_RULE_PRIORITY), check=False)
        if self._pidfile("kube-router").pid() is None:
            self._remove_kube_router_rules()
        return stopped

    @staticmethod
    def _remove_kube_router_rules() -> None:
        """kube-router's filter chains, then its ipsets (a set is destroyed once no rule
        refers to it)."""
        if shutil.which("iptables") is None:
            return
        for args in kube_router_cleanup(_run("iptables", "-S", check=False)):
            _run("iptables", *args, check=False)
        if shutil.which("ipset") is None:
            return
        for name in _run("ipset", "list", "-n", check=False).split():
            if name.startswith(KUBE_ROUTER_IPSETS):
                _run("ipset", "destroy", name, check=False)

    def _kill_containers(self) -> None:
        """Kills the containers containerd still runs (their shims would outlive it)."""
        with contextlib.suppress(StackError):
            for line in self.ctr("tasks", "ls", "-q").split():
                self.ctr("tasks", "kill", "--signal", "SIGKILL", line, check=False)
            wait_until(
                lambda: (
                    not any("RUNNING" in line for line in self.ctr("tasks", "ls").splitlines()[1:])
                ),
                timeout=30,
                what="containerd's containers to stop",
            )
            for task in self.ctr("tasks", "ls", "-q").split():
                self.ctr("tasks", "delete", task, check=False)

    def delete(self) -> None:
        self.stop()
        kube_proxy = tools_bin() / "kube-proxy"
        if kube_proxy.exists():
            _run(str(kube_proxy), "--cleanup", check=False)
        self._unmount_under(self.data_dir)
        self._unmount_under(self.containerd_state)
        for device in (CNI_BRIDGE, NODE_DEVICE):
            _run("ip", "link", "delete", device, check=False)
        shutil.rmtree(self.containerd_state, ignore_errors=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    @staticmethod
    def _unmount_under(folder: Path) -> None:
        prefix = str(folder.resolve()) + "/"
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(prefix)
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            _run("umount", "-l", mount, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(
        argv,
        prog="k8s/node-cluster",
        description=__doc__.split("\n")[0],
        cluster=lambda data_dir: NodeCluster((data_dir or default_node_dir()).resolve()),
    )


if __name__ == "__main__":
    sys.exit(main())
