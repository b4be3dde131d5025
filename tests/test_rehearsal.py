"""The deployment rehearsal (``make rehearsal``, robustmedseg/federation/rehearsal.py) end to end: a researcher
and three hospitals on separate network namespaces, built with the commands of docs/phase1.md, then every
network fault; slow (8.5-11.5 min on 2 shared cores) and root only (it skips with the reason elsewhere).

Checked: the tiny secure-aggregation run and its export (loads strictly, samples) equal, tensor for tensor,
what a loopback federation gives with the same seed and dataset names; each fault that stops a round ends in
exactly one ``error:`` line naming the node (exit 2) and ``train.py --resume`` then reaches the next round; a
slow link only slows the round; a killed researcher is resumed; a node that approved another release of the
plan is refused by name; a node claiming another node's id is refused by the secure-aggregation key setup
(one line) and, without secure aggregation, is sent the task and stopped only by Fed-BioMed's node-state
check (one line naming the node it claims to be); only the researcher listens on a port reachable from the network; afterwards
no namespace and no process of the rehearsal is left.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from robustmedseg.federation.netns import namespaces_available

pytestmark = pytest.mark.slow


def test_rehearsal_across_network_hosts(tmp_path):
    why = namespaces_available()  # probed here, not at collection (it adds and deletes a namespace)
    if why is not None:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    from robustmedseg.federation.rehearsal import FAULTS, rehearse

    prefix = f"rmst{os.getpid() % 10000}"
    out = tmp_path / "rehearsal"
    try:
        summary = rehearse(out, FAULTS, seed=0, rounds=2, prefix=prefix, log=print)
    finally:
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, left  # every namespace removed, also on failure
    assert summary["ok"] and json.loads((out / "rehearsal.json").read_text())["ok"]
    assert (out / "REHEARSAL.md").is_file()
    assert summary["exports"]["certificate"]["addresses"] == ["10.231.0.1"]  # the researcher's address
    assert summary["exports"]["loopback"]["equal"], summary["exports"]
    faults = summary["faults"]
    for fault, node in (("cut", "hosp1"), ("restart", "hosp3"), ("release", "hosp2")):
        rec = faults[fault]
        assert rec["exit"] == 2 and rec["one_line_naming_node"], rec
        assert rec["line"].startswith("error: round ") and f"node {node} (NODE_" in rec["line"], rec
        assert rec["resume_ok"], rec
    assert "no training reply" in faults["cut"]["line"] and "no training reply" in faults["restart"]["line"]
    assert faults["release"]["refused_by_hash"], faults["release"]
    assert faults["slow"]["resume_ok"], faults["slow"]  # a slow link only slows the round down
    assert faults["researcher"]["resume_ok"] and faults["researcher"]["resumed"], faults["researcher"]
    assert faults["impostor"]["resume_ok"], faults["impostor"]
    for case in ("both online", "hosp1 down"):  # under secure aggregation the key setup fails: refused
        rec = faults["impostor"][case]
        assert rec["exit"] == 2 and rec["line"].startswith("error: round ") and not rec["impostor_received_task"], rec
        assert "secure aggregation failed" in rec["line"], rec
    rec = faults["impostor"]["plain, hosp1 down"]  # plain: it gets the task, Fed-BioMed's node state stops it
    assert rec["exit"] == 2 and rec["impostor_received_task"], rec
    assert "node hosp1 (NODE_" in rec["line"] and "Can't read previous node state" in rec["line"], rec
    rec = faults["impostor"]["wrong address"]  # a node pointed at an address the researcher does not serve
    assert rec["exit"] == 2 and not rec["joined"] and rec["line"].startswith("error: waited 40 s for 2 nodes"), rec
    sockets = summary["exports"]["sockets"]  # the nodes listen on nothing reachable: only outgoing connections
    assert any(addr.endswith(":50151") for addr in sockets["researcher"]["listening"]), sockets
    for host in ("hosp1", "hosp2", "hosp3"):
        assert not [a for a in sockets[host]["listening"] if not a.startswith(("127.", "[::1]"))], sockets
