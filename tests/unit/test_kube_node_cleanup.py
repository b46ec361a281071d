"""What `k8s/node-cluster stop` removes of kube-router's firewall (scripts/kube_node.py)."""

from scripts.kube_node import kube_router_cleanup

RULES = """\
-P INPUT ACCEPT
-P FORWARD DROP
-N DOCKER
-N KUBE-FORWARD
-N KUBE-NWPLCY-DEFAULT
-N KUBE-NWPLCY-3Y7GZRW2TYHSRXXG
-N KUBE-POD-FW-ABCDEFGHIJKLMNOP
-N KUBE-ROUTER-FORWARD
-N KUBE-ROUTER-INPUT
-A INPUT -m comment --comment "kube-router netpol - 4IA2OSFRMVNDXBVV" -j KUBE-ROUTER-INPUT
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A FORWARD -m comment --comment "kube-router netpol - TEMCG2JMHZYE7H7T" -j KUBE-ROUTER-FORWARD
-A FORWARD -j DOCKER
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-POD-FW-ABCDEFGHIJKLMNOP -j KUBE-NWPLCY-3Y7GZRW2TYHSRXXG
-A KUBE-ROUTER-FORWARD -d 10.88.0.5/32 -j KUBE-POD-FW-ABCDEFGHIJKLMNOP
"""


def test_jumps_then_flush_then_delete_only_kube_routers_chains() -> None:
    ours = [
        "KUBE-NWPLCY-DEFAULT",
        "KUBE-NWPLCY-3Y7GZRW2TYHSRXXG",
        "KUBE-POD-FW-ABCDEFGHIJKLMNOP",
        "KUBE-ROUTER-FORWARD",
        "KUBE-ROUTER-INPUT",
    ]
    assert kube_router_cleanup(RULES) == [
        ["-D", "INPUT", "-m", "comment", "--comment", "kube-router netpol - 4IA2OSFRMVNDXBVV",
         "-j", "KUBE-ROUTER-INPUT"],
        ["-D", "FORWARD", "-m", "comment", "--comment", "kube-router netpol - TEMCG2JMHZYE7H7T",
         "-j", "KUBE-ROUTER-FORWARD"],
        *(["-F", chain] for chain in ours),
        *(["-X", chain] for chain in ours),
    ]  # fmt: skip


def test_nothing_to_remove_when_kube_router_never_ran() -> None:
    rules = "-P INPUT ACCEPT\n-N DOCKER\n-A FORWARD -j DOCKER\n"
    assert kube_router_cleanup(rules) == []
