"""A small multi-network suite: the default network plus two extra ones from marks.

Run it (as root) on the built-in lab:  pytest examples --svctunnel-backend lab
or on the cluster of your kubeconfig:  pytest examples
"""

import socket
import subprocess

import pytest


def ping(address, dev, *extra):
    done = subprocess.run(
        ["ping", "-c", "1", "-W", "2", "-I", dev, *extra, str(address)], capture_output=True, text=True
    )
    return done.returncode == 0


def tcp_answered(address, port=9):
    """A TCP connection to the pod end gets the pod's answer: nothing listens on ``port`` there, so
    the pod refuses it (a timeout would mean TCP does not cross the tunnel)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        try:
            sock.connect((str(address), port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return True


def test_default_network_ipv4(svctunnel):
    assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
    assert tcp_answered(svctunnel.remote_ipv4.ip)


def test_default_network_ipv6(svctunnel):
    assert ping(svctunnel.remote_ipv6.ip, svctunnel.dev)
    assert tcp_answered(svctunnel.remote_ipv6.ip)


@pytest.mark.svctunnel_network("signalling")
def test_signalling_network(svctunnel_network):
    assert ping(svctunnel_network.remote_ipv4.ip, svctunnel_network.dev)
    assert ping(svctunnel_network.remote_ipv6.ip, svctunnel_network.dev)


@pytest.mark.svctunnel_network("media", ipv4="10.40.0.0/29", vni=4000)
def test_media_network(svctunnel_network):
    assert svctunnel_network.vni == 4000
    assert ping(svctunnel_network.remote_ipv4.ip, svctunnel_network.dev)
    assert ping(svctunnel_network.remote_ipv6.ip, svctunnel_network.dev)


def test_networks_are_separate(svctunnel_networks):
    assert set(svctunnel_networks) == {"default", "signalling", "media"}
    assert len({n.vni for n in svctunnel_networks.values()}) == 3
