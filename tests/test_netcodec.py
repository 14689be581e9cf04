"""The networks of a hello as runs: which networks join a run, what the runs take, and that they read back."""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_svctunnel.netcodec import (
    MAX_NETWORKS,
    RUN_MAX,
    PodNetwork,
    Run,
    decode_runs,
    encode_runs,
    encoded_size,
    pack_runs,
    validate_network,
)

# The layout of a run, written out independently of the module's structs.
RUN_FORMAT = "!HIIB4sIB16sQB"  # count, vni, vni step, v4 plen, v4, v4 step, v6 plen, v6, v6 step, name prefix length
RUN_HEAD = 2 + 4 + 4 + 1 + 4 + 4 + 1 + 16 + 8 + 1
SUFFIX_LEN = 2 + 1  # the first device's number, its digits
ABSENT = 0xFF

V4_BASE = int(ipaddress.IPv4Address("10.30.30.1"))
V6_BASE = int(ipaddress.IPv6Address("fd00:3030::1"))


def run_len(prefix: str) -> int:
    return RUN_HEAD + len(prefix) + SUFFIX_LEN


def default_nets(count: int, session: str = "abc123") -> list[PodNetwork]:
    """A session's default numbering: VNI +1, /30 and /126 blocks +4, devices ``svt<session>-0``, ``-1``, ..."""
    return [
        PodNetwork(
            333 + i,
            f"svt{session}-{i}",
            ipaddress.IPv4Interface((V4_BASE + 4 * i, 30)),
            ipaddress.IPv6Interface((V6_BASE + 4 * i, 126)),
        )
        for i in range(count)
    ]


def named(*names: str) -> list[PodNetwork]:
    """Networks whose VNIs and addresses follow each other, with the given device names."""
    return [
        PodNetwork(
            100 + i,
            name,
            ipaddress.IPv4Interface((V4_BASE + 4 * i, 30)),
            ipaddress.IPv6Interface((V6_BASE + 4 * i, 126)),
        )
        for i, name in enumerate(names)
    ]


_RNG = random.Random(7)


def irregular(count: int) -> list[PodNetwork]:
    """Networks that follow nothing, with 15-character names without a number: a run each, of the largest kind."""
    vnis = _RNG.sample(range(1, 0xFFFFFF + 1), count)
    return [
        PodNetwork(
            vnis[i],
            f"q{i:03d}-irregular-x"[:15],
            ipaddress.IPv4Interface((_RNG.randrange(2**32), 24)),
            ipaddress.IPv6Interface((_RNG.randrange(2**64, 2**128), 64)),
        )
        for i in range(count)
    ]


def counts(runs: list[Run]) -> list[int]:
    return [run.count for run in runs]


def round_trip(nets: list[PodNetwork]) -> list[Run]:
    """Pack, encode and decode ``nets``; check they read back the same and take encoded_size bytes."""
    runs = pack_runs(nets)
    raw = encode_runs(runs)
    assert decode_runs(raw, len(runs)) == (tuple(nets), len(raw))
    assert encoded_size(nets) == len(raw)
    assert [n for run in runs for n in run.networks()] == nets
    return runs


def test_limits() -> None:
    assert MAX_NETWORKS == 1024
    assert RUN_MAX == RUN_HEAD + 15 + SUFFIX_LEN == 63


# -- which networks join a run -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 256, 1024])
def test_default_numbering_is_one_run(n: int) -> None:
    nets = default_nets(n)
    (run,) = round_trip(nets)
    assert run.count == n
    assert run.nth(0) == nets[0] and run.nth(n - 1) == nets[-1]
    assert encoded_size(nets) == run_len("svtabc123-") == 58
    assert encode_runs([run])[: struct.calcsize(RUN_FORMAT)] == struct.pack(
        RUN_FORMAT,
        n,
        333,
        1 if n > 1 else 0,
        30,
        ipaddress.IPv4Address("10.30.30.1").packed,
        4 if n > 1 else 0,
        126,
        ipaddress.IPv6Address("fd00:3030::1").packed,
        4 if n > 1 else 0,
        len("svtabc123-"),
    )


BREAKERS: dict[str, tuple[dict[str, object], str]] = {
    "addresses-above-the-next": (
        {"ipv4": ipaddress.IPv4Interface("192.168.77.1/30"), "ipv6": ipaddress.IPv6Interface("fd99::1/126")},
        "svtabc123-",
    ),
    "ipv4-above-the-next": ({"ipv4": ipaddress.IPv4Interface("192.168.77.1/30")}, "svtabc123-"),
    "ipv6-above-the-next": ({"ipv6": ipaddress.IPv6Interface("fd99::1/126")}, "svtabc123-"),
    "vni-above-the-next": ({"vni": 50_000}, "svtabc123-"),
    "device-name-of-its-own": ({"dev": "eth7"}, "eth"),
    "unnumbered-device-name": ({"dev": "pod-dev"}, "pod-dev"),
    "ipv4-prefix-length-of-its-own": ({"ipv4": ipaddress.IPv4Interface((V4_BASE + 16, 29))}, "svtabc123-"),
}


@pytest.mark.parametrize(("change", "prefix"), BREAKERS.values(), ids=BREAKERS.keys())
def test_a_network_of_its_own_in_the_middle_splits_into_three_runs(change: dict[str, object], prefix: str) -> None:
    nets = default_nets(10)
    nets[4] = replace(nets[4], **change)  # type: ignore[arg-type]
    runs = round_trip(nets)
    assert counts(runs) == [4, 1, 5]
    assert encoded_size(nets) == 2 * run_len("svtabc123-") + run_len(prefix)


def test_the_network_after_one_with_lower_addresses_joins_it() -> None:
    """Greedy, in order: the network after one of its own joins its run when it follows it (VNI, name and
    addresses all grow), and the rest start a run again."""
    nets = default_nets(10)
    lower = {"ipv4": ipaddress.IPv4Interface("10.0.0.1/30"), "ipv6": ipaddress.IPv6Interface("fd00:3030::/126")}
    nets[4] = replace(nets[4], **lower)  # type: ignore[arg-type]
    assert counts(round_trip(nets)) == [4, 2, 4]


def test_ipv4_only_among_dual_stack_breaks_runs() -> None:
    nets = default_nets(5)
    nets[2] = replace(nets[2], ipv6=None)
    assert counts(round_trip(nets)) == [2, 1, 2]


def test_ipv6_only_after_dual_stack_breaks_runs() -> None:
    nets = default_nets(4)
    nets[2:] = [replace(n, ipv4=None) for n in nets[2:]]
    assert counts(round_trip(nets)) == [2, 2]


def test_networks_without_addresses_join() -> None:
    nets = [replace(n, ipv4=None, ipv6=None) for n in default_nets(5)]
    (run,) = round_trip(nets)
    assert run.count == 5


NAMES: dict[str, tuple[tuple[str, ...], list[int]]] = {
    "net9-net10": (("net9", "net10"), [2]),
    "net09-net10": (("net09", "net10"), [2]),
    "x99-x100": (("x99", "x100"), [2]),
    "x0009-x0010": (("x0009", "x0010"), [2]),
    "no-prefix": (("7", "8", "9"), [3]),
    "net1-net3": (("net1", "net3"), [1, 1]),
    "net1-net2-net4": (("net1", "net2", "net4"), [2, 1]),
    "net2-net1": (("net2", "net1"), [1, 1]),
    "net1-net01": (("net1", "net01"), [1, 1]),
    "other-prefix": (("a1", "b2"), [1, 1]),
    "no-digits": (("alpha", "beta"), [1, 1]),
    "no-digits-same-start": (("eth-a", "eth-b", "eth-c"), [1, 1, 1]),
    "digits-inside-only": (("v1a", "v2a"), [1, 1]),
    "5-digit-suffixes": (("n12345", "n12346", "n12347"), [3]),
    "5-digit-suffix-past-its-last-4": (("n19999", "n20000"), [1, 1]),
}


@pytest.mark.parametrize(("names", "expected"), NAMES.values(), ids=NAMES.keys())
def test_device_names_join_when_their_numbers_follow(names: tuple[str, ...], expected: list[int]) -> None:
    assert counts(round_trip(named(*names))) == expected


def test_5_digit_suffixes_are_numbered_by_their_last_4_digits() -> None:
    (run,) = round_trip(named("n12345", "n12346"))
    raw = encode_runs([run])
    assert raw[RUN_HEAD - 1] == 2 and raw[RUN_HEAD : RUN_HEAD + 2] == b"n1"
    assert struct.unpack_from("!HB", raw, RUN_HEAD + 2) == (2345, 4)


FOLLOW: dict[str, tuple[dict[str, object], list[int]]] = {
    "vni-increasing": ({"vni": 11}, [2]),
    "vni-decreasing": ({"vni": 9}, [1, 1]),
    "ipv4-increasing": ({"ipv4": ipaddress.IPv4Interface("10.0.0.12/30")}, [2]),
    "ipv4-decreasing": ({"ipv4": ipaddress.IPv4Interface("10.0.0.4/30")}, [1, 1]),
    "ipv4-the-same": ({"ipv4": ipaddress.IPv4Interface("10.0.0.8/30")}, [2]),
    "ipv6-increasing": ({"ipv6": ipaddress.IPv6Interface("fd00::c/126")}, [2]),
    "ipv6-decreasing": ({"ipv6": ipaddress.IPv6Interface("fd00::4/126")}, [1, 1]),
    "ipv6-other-prefix-length": ({"ipv6": ipaddress.IPv6Interface("fd00::c/64")}, [1, 1]),
    "ipv4-absent": ({"ipv4": None}, [1, 1]),
    "ipv6-absent": ({"ipv6": None}, [1, 1]),
}


@pytest.mark.parametrize(("second", "expected"), FOLLOW.values(), ids=FOLLOW.keys())
def test_a_network_joins_only_with_steps_of_zero_or_more(second: dict[str, object], expected: list[int]) -> None:
    first = PodNetwork(10, "eth1", ipaddress.IPv4Interface("10.0.0.8/30"), ipaddress.IPv6Interface("fd00::8/126"))
    nets = [first, replace(first, **{"vni": 11, "dev": "eth2", **second})]  # type: ignore[arg-type]
    assert counts(round_trip(nets)) == expected


def test_the_first_two_networks_fix_the_steps() -> None:
    steps = [
        ("vni", [10, 12, 14, 17, 20]),
        ("ipv4", [ipaddress.IPv4Interface(f"10.0.0.{a}/32") for a in (1, 3, 5, 8, 11)]),
    ]
    for field, values in steps:
        nets = [replace(n, **{field: v}) for n, v in zip(named(*(f"d{i}" for i in range(5))), values, strict=True)]
        assert counts(round_trip(nets)) == [3, 2], field


def test_a_run_is_as_long_as_the_networks_follow() -> None:
    nets = default_nets(6) + [replace(n, vni=n.vni + 1000) for n in default_nets(12)[6:]]
    (first, second) = round_trip(nets)
    assert (first.count, second.count) == (6, 6)


# -- what the runs take --------------------------------------------------------------------------------------------


def test_encoded_size() -> None:
    assert encoded_size([]) == 0
    assert encoded_size(default_nets(1024)) == run_len("svtabc123-")
    assert encoded_size(irregular(17)) == 17 * 63 == 17 * RUN_MAX
    assert encoded_size([PodNetwork(1, "eth", None, None), *default_nets(3)]) == run_len("eth") + run_len("svtabc123-")
    assert encoded_size(named("n12345", "n12346")) == run_len("n1")
    assert encoded_size(named("0")) == run_len("")


def test_17_irregular_networks_take_17_of_the_largest_runs() -> None:
    nets = irregular(17)
    runs = round_trip(nets)
    assert counts(runs) == [1] * 17
    assert len(encode_runs(runs)) == 17 * 63


def test_the_layout_of_a_run() -> None:
    nets = [
        PodNetwork(7, "eth", None, ipaddress.IPv6Interface("fd00::1/64")),
        PodNetwork(100, "vx07", ipaddress.IPv4Interface("10.1.2.3/24"), None),
        PodNetwork(105, "vx08", ipaddress.IPv4Interface("10.1.2.13/24"), None),
    ]
    raw = encode_runs(pack_runs(nets))
    v6 = ipaddress.IPv6Address("fd00::1").packed
    v4 = ipaddress.IPv4Address("10.1.2.3").packed
    assert raw == (
        struct.pack(RUN_FORMAT, 1, 7, 0, ABSENT, bytes(4), 0, 64, v6, 0, 3)
        + b"eth"
        + struct.pack("!HB", 0, 0)
        + struct.pack(RUN_FORMAT, 2, 100, 5, 24, v4, 10, ABSENT, bytes(16), 0, 2)
        + b"vx"
        + struct.pack("!HB", 7, 2)
    )


# -- reading runs back ---------------------------------------------------------------------------------------------


def test_decode_runs_reads_only_its_runs_and_says_where_they_end() -> None:
    nets = [*default_nets(3), PodNetwork(9, "eth", None, None)]
    raw = encode_runs(pack_runs(nets))
    assert decode_runs(raw + b"more", 2) == (tuple(nets), len(raw))
    assert decode_runs(raw, 1) == (tuple(nets[:3]), run_len("svtabc123-"))


def raw_run(
    count: int = 1,
    vni: int = 100,
    vni_step: int = 0,
    plen4: int = ABSENT,
    plen6: int = ABSENT,
    prefix: bytes = b"eth",
    number: int = 0,
    width: int = 0,
    name_len: int | None = None,
) -> bytes:
    head = struct.pack(
        RUN_FORMAT,
        count,
        vni,
        vni_step,
        plen4,
        bytes(4),
        0,
        plen6,
        bytes(16),
        0,
        len(prefix) if name_len is None else name_len,
    )
    return head + prefix + struct.pack("!HB", number, width)


def test_a_hand_built_run_decodes() -> None:
    raw = raw_run(count=3, vni_step=2, plen4=8, prefix=b"n", number=8, width=2)
    nets = tuple(PodNetwork(100 + 2 * i, f"n{8 + i:02d}", ipaddress.IPv4Interface("0.0.0.0/8"), None) for i in range(3))
    assert decode_runs(raw, 1) == (nets, len(raw))


BAD_RUNS: dict[str, tuple[bytes, int]] = {
    "count-0": (raw_run(count=0), 1),
    "name-16": (raw_run(prefix=b"abcdefghijklmnop"), 1),
    "count-2-vni-step-0": (raw_run(count=2, width=1), 1),
    "count-2-width-0": (raw_run(count=2, vni_step=1), 1),
    "width-5": (raw_run(number=1, width=5), 1),
    "name-cut-short": (raw_run(name_len=10)[: RUN_HEAD + 3], 1),
    "1025-networks": (raw_run(count=1025, vni_step=1, width=1), 1),
    "1025-networks-in-two-runs": (
        raw_run(count=1000, vni_step=1, width=1) + raw_run(count=25, vni=2000, prefix=b"x"),
        2,
    ),
    "vni-0": (raw_run(vni=0), 1),
    "vni-past-2**24-1": (raw_run(count=2, vni=0xFFFFFF, vni_step=1, width=1), 1),
    "bad-device-name": (raw_run(prefix=b"a/b"), 1),
    "empty-device-name": (raw_run(prefix=b""), 1),
    "duplicate-vni": (raw_run(prefix=b"a") + raw_run(prefix=b"b"), 2),
    "duplicate-device-name": (raw_run(prefix=b"a") + raw_run(vni=101, prefix=b"a"), 2),
    "ipv4-prefix-33": (raw_run(plen4=33), 1),
    "ipv6-prefix-129": (raw_run(plen6=129), 1),
}


@pytest.mark.parametrize(("raw", "runs"), BAD_RUNS.values(), ids=BAD_RUNS.keys())
def test_decode_runs_refuses(raw: bytes, runs: int) -> None:
    with pytest.raises(ValueError):
        decode_runs(raw, runs)


def test_decode_runs_refuses_runs_that_are_cut_short() -> None:
    raw = encode_runs(pack_runs(default_nets(3)))
    for end in range(len(raw)):
        with pytest.raises((ValueError, struct.error)):
            decode_runs(raw[:end], 1)


def test_validate_network() -> None:
    validate_network(PodNetwork(0xFFFFFF, "a" * 15, None, None))
    with pytest.raises(ValueError, match="VNI"):
        validate_network(PodNetwork(0, "eth0", None, None))
    with pytest.raises(ValueError, match="VNI"):
        validate_network(PodNetwork(0x1000000, "eth0", None, None))
    with pytest.raises(ValueError, match="device name"):
        validate_network(PodNetwork(1, "a" * 16, None, None))


# -- edges: IPv6 steps past the wire's 64 bits, small IPv6 addresses -----------------------------------------------


WIDE_STEPS: dict[str, list[PodNetwork]] = {
    "two-64s": [
        PodNetwork(1, "a1", None, ipaddress.IPv6Interface("fd00:1::1/64")),
        PodNetwork(2, "a2", None, ipaddress.IPv6Interface("fd00:2::1/64")),
    ],
    # an explicit ipv6= below the default pool, then a default network (as plan_networks makes them)
    "explicit-then-default": [
        PodNetwork(
            334, "svtabc123-1", ipaddress.IPv4Interface("10.30.30.5/30"), ipaddress.IPv6Interface("fd00:1::1/126")
        ),
        *default_nets(3)[2:],
    ],
}


@pytest.mark.parametrize("nets", WIDE_STEPS.values(), ids=WIDE_STEPS.keys())
def test_ipv6_steps_past_64_bits_start_a_run_of_their_own(nets: list[PodNetwork]) -> None:
    assert counts(round_trip(nets)) == [1, 1]


def test_ipv6_below_2_to_32_with_a_short_prefix_round_trips() -> None:
    nets = [
        PodNetwork(1, "a1", None, ipaddress.IPv6Interface("::1/32")),
        PodNetwork(2, "a2", None, ipaddress.IPv6Interface("::5/32")),
    ]
    assert counts(round_trip(nets)) == [2]
    assert all(isinstance(n.ipv6, ipaddress.IPv6Interface) for r in pack_runs(nets) for n in r.networks())


# -- properties ----------------------------------------------------------------------------------------------------


dev_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/:%"), min_size=1, max_size=15
).filter(lambda s: s not in (".", ".."))
numbered_names = st.tuples(st.sampled_from(["a", "b-", "x9y", ""]), st.integers(0, 12)).map(lambda t: f"{t[0]}{t[1]}")
networks = st.builds(
    PodNetwork,
    vni=st.integers(1, 40) | st.integers(1, 0xFFFFFF),
    dev=numbered_names | dev_names,
    ipv4=st.none() | st.builds(ipaddress.IPv4Interface, st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32))),
    ipv6=st.none() | st.builds(ipaddress.IPv6Interface, st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128))),
)


@given(st.lists(networks, min_size=1, max_size=40, unique_by=(lambda n: n.vni, lambda n: n.dev)))
def test_property_any_networks_read_back(nets: list[PodNetwork]) -> None:
    runs = round_trip(nets)
    assert sum(counts(runs)) == len(nets)
    assert encoded_size(nets) <= len(nets) * RUN_MAX


@given(
    count=st.integers(1, MAX_NETWORKS),
    vni=st.integers(1, 1000),
    vni_step=st.integers(1, 1000),
    step4=st.integers(0, 2**16),
    step6=st.integers(0, 2**64 - 1),
    prefix=st.text(alphabet="abcxyz-_.", min_size=1, max_size=11),
    number=st.integers(0, 9999),
    width=st.integers(1, 4),
)
def test_property_networks_that_follow_are_one_run(
    count: int, vni: int, vni_step: int, step4: int, step6: int, prefix: str, number: int, width: int
) -> None:
    count = min(count, 10**4 - number)
    nets = [
        PodNetwork(
            vni + i * vni_step,
            f"{prefix}{str(number + i).zfill(width)}",
            ipaddress.IPv4Interface((i * step4, 28)),
            ipaddress.IPv6Interface((2**40 + i * step6, 100)),
        )
        for i in range(count)
    ]
    (run,) = round_trip(nets)
    assert run.count == count
    assert encoded_size(nets) == run_len(prefix)
