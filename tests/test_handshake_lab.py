"""The agent's handshake rules, spoken by hand to a real agent through the lab's NAT and Service."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pytest_svctunnel.lab import Lab
from pytest_svctunnel.protocol import (
    MAGIC,
    Ack,
    Challenge,
    Confirm,
    Hello,
    Message,
    PodNetwork,
    ProtocolError,
    decode,
    encode,
)

from .helpers import ping

pytestmark = pytest.mark.root

HELLO = Hello(1450, (PodNetwork(333, "vxlan0", ipaddress.IPv4Interface("10.30.30.1/30"), None),))


class Speaker:
    """One UDP socket on this host, talking to the Service with a given key."""

    def __init__(self, lab: Lab, key: bytes) -> None:
        self.key = key
        self.session = secrets.token_bytes(8)
        self.counter = 0
        self.service = lab.plan.service(4)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))

    def datagram(self, body: Hello | Confirm, stamp_ms: int | None = None) -> bytes:
        self.counter += 1
        stamp = int(time.time() * 1000) if stamp_ms is None else stamp_ms
        return encode(Message(self.session, self.counter, stamp, body), self.key)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (str(self.service.address), self.service.port))

    def answer(self, timeout: float = 1.5) -> Message | None:
        """The next handshake message; tunnel frames (once the pod has committed) are skipped."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return None
            if data[:4] != MAGIC:
                continue
            try:
                return decode(data, self.key)
            except ProtocolError as exc:
                raise AssertionError(f"the agent sent an invalid answer: {exc}") from None
        return None


@pytest.fixture
def agent(lab: Lab, key: bytes) -> Lab:
    lab.start_agent(key)
    return lab


@pytest.fixture
def speaker(agent: Lab, key: bytes) -> Iterator[Speaker]:
    s = Speaker(agent, key)
    yield s
    s.sock.close()


def _challenge(speaker: Speaker) -> Challenge:
    speaker.send(speaker.datagram(HELLO))
    answer = speaker.answer()
    assert answer is not None and isinstance(answer.body, Challenge)
    return answer.body


def test_challenge_reports_the_address_after_nat(speaker: Speaker, agent: Lab) -> None:
    challenge = _challenge(speaker)
    assert challenge.observed.address == agent.plan.public_address(4)
    assert challenge.observed.port != speaker.sock.getsockname()[1]


def test_replayed_hello_is_not_answered(speaker: Speaker, agent: Lab) -> None:
    hello = speaker.datagram(HELLO)
    speaker.send(hello)
    assert speaker.answer() is not None
    speaker.send(hello)
    assert speaker.answer() is None
    assert "replayed" in agent.log_text()


def test_stale_hello_is_not_answered(speaker: Speaker, agent: Lab) -> None:
    ten_minutes_ago = int((time.time() - 600) * 1000)
    speaker.send(speaker.datagram(HELLO, stamp_ms=ten_minutes_ago))
    assert speaker.answer() is None
    assert "stale" in agent.log_text()


def test_confirm_without_a_challenge_is_not_answered(speaker: Speaker, agent: Lab) -> None:
    speaker.send(speaker.datagram(Confirm(secrets.token_bytes(16))))
    assert speaker.answer() is None
    assert "unsolicited" in agent.log_text()


def test_confirm_raced_from_another_sender_does_not_commit(speaker: Speaker, agent: Lab) -> None:
    """An eavesdropper who copies the rightful CONFIRM and races it from elsewhere neither takes the
    tunnel nor cancels the challenge: the rightful sender's next CONFIRM still commits."""
    challenge = _challenge(speaker)
    confirm = speaker.datagram(Confirm(challenge.nonce))
    thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        thief.bind(("0.0.0.0", 0))
        thief.sendto(confirm, (str(speaker.service.address), speaker.service.port))
        thief.settimeout(1.5)
        with pytest.raises(TimeoutError):
            thief.recv(4096)
    finally:
        thief.close()
    assert "up: tunnel up" not in agent.log_text()
    speaker.send(confirm)  # the very same bytes, now from the right place: a replay by then
    assert speaker.answer(0.5) is None
    speaker.send(speaker.datagram(Confirm(challenge.nonce)))  # the retransmission, with a fresh counter
    answer = speaker.answer()
    assert answer is not None and isinstance(answer.body, Ack)
    assert answer.body.built == 1 and answer.body.mtu == 1450
    assert answer.body.observed.address == agent.plan.public_address(4)


def test_garbage_on_the_port_is_not_answered(speaker: Speaker, agent: Lab) -> None:
    for data in (b"SVTN", b"SVTN" + bytes(100), secrets.token_bytes(80), b"\x08" + bytes(15)):
        speaker.send(data)
    assert speaker.answer() is None
    assert agent.agent.alive()


def test_hello_naming_the_pods_own_interface_is_refused(speaker: Speaker, agent: Lab) -> None:
    """An authenticated hello asking for "eth0" must not take the pod off its network, nor stop the agent."""
    hostile = Hello(1450, (PodNetwork(333, "eth0", ipaddress.IPv4Interface("10.30.30.1/30"), None),))
    speaker.send(speaker.datagram(hostile))
    answer = speaker.answer()
    assert answer is not None and isinstance(answer.body, Challenge)
    speaker.send(speaker.datagram(Confirm(answer.body.nonce)))
    assert speaker.answer() is None, "nothing was built, so nothing is acknowledged"
    assert "not a VXLAN device" in agent.log_text()
    assert agent.agent.alive()
    assert ping(agent.plan.address(4, 4, 1), ns=agent.plan.ns("pod")).returncode == 0, "pod eth0 still works"
    # and a proper hello still works afterwards
    challenge = _challenge(speaker)
    speaker.send(speaker.datagram(Confirm(challenge.nonce)))
    done = speaker.answer()
    assert done is not None and isinstance(done.body, Ack) and done.body.built == 1


def _shake(speaker: Speaker, hello: Hello) -> Message | None:
    speaker.send(speaker.datagram(hello))
    answer = speaker.answer()
    assert answer is not None and isinstance(answer.body, Challenge)
    speaker.send(speaker.datagram(Confirm(answer.body.nonce)))
    return speaker.answer()


def test_in_an_applications_namespace_the_agent_takes_no_link_it_did_not_make(lab: Lab, key: bytes) -> None:
    """Injected into a pod, the agent shares the namespace with the application: a VXLAN device of the
    application's that has the name a hello asks for is refused and left as it was (an agent of its own pod
    would reuse a matching device of its own), and the agent goes on serving."""
    pod = lab.plan.ns("pod")
    subprocess.run(
        ["ip", "-n", pod, "link", "add", "vxlan0", "type", "vxlan", "id", "999", "dstport", "4789"], check=True
    )
    lab.start_agent(key, shared_netns=True)
    speaker = Speaker(lab, key)
    try:
        assert _shake(speaker, HELLO) is None, "nothing was built, so nothing is acknowledged"
        assert "the pod has a link named vxlan0 that is not the agent's" in lab.log_text()
        link = subprocess.run(["ip", "-n", pod, "-d", "-o", "link", "show", "vxlan0"], capture_output=True, text=True)
        assert "vxlan id 999 " in link.stdout, link.stdout
        other = Hello(1450, (PodNetwork(333, "net1", ipaddress.IPv4Interface("10.30.30.1/30"), None),))
        speaker.session = secrets.token_bytes(8)
        done = _shake(speaker, other)
        assert done is not None and isinstance(done.body, Ack) and done.body.built == 1
    finally:
        speaker.sock.close()


def test_a_second_agent_in_an_applications_namespace_refuses_to_start(lab: Lab, key: bytes) -> None:
    """One agent per port in a shared namespace: a second one finds the first one's nft table, says so in one
    line and exits without touching it."""
    running = lab.start_agent(key, shared_netns=True)
    table = f"svctunnel_{lab.plan.port}"
    argv = ["ip", "netns", "exec", lab.plan.ns("pod"), sys.executable, "-m", "pytest_svctunnel", "agent"]
    argv += ["--key-file", str(running.key_file), "--port", str(lab.plan.port), "--shared-netns"]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert second.returncode == 1, second.stderr
    assert f"the pod already has an nft table inet {table}: another svctunnel agent serves port" in second.stderr
    assert "Traceback" not in second.stderr
    listed = subprocess.run(["ip", "netns", "exec", lab.plan.ns("pod"), "nft", "list", "table", "inet", table])
    assert listed.returncode == 0, "the first agent's filter stays"
    assert running.alive()
