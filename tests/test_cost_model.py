"""The alpha-beta model behind comm.algo=auto, on made-up links whose answer is known (no MPI)."""

import pytest

from tpi_mpi.comm.cost_model import LinkModel, WireCost, choose, choose_wire, predict, predict_wire, tree_rounds

HIDDEN_4096_FP32 = 4096 * 4  # one decode token of a 7B model


def test_latency_bound_link_picks_one_round() -> None:
    # Edge Wi-Fi: 5 ms per message, 1 GB/s. A 16 KiB message costs 16 us on the wire, so the number
    # of message rounds decides: mesh (1) < star (2) < tree (3) < ring (14).
    link = LinkModel(alpha=5e-3, beta=1e-9)
    best, pred = choose(8, HIDDEN_4096_FP32, link)
    assert best == "mesh"
    assert pred["mesh"] < pred["star"] < pred["tree"] < pred["ring"]
    # Without mesh, star's two hops beat the others.
    assert choose(8, HIDDEN_4096_FP32, link, ("star", "ring", "tree"))[0] == "star"


def test_bandwidth_bound_link_picks_ring() -> None:
    # 1 us per message, 100 MB/s, a 64 MiB buffer: bytes per rank decide, and ring sends the fewest.
    link = LinkModel(alpha=1e-6, beta=1e-8)
    best, pred = choose(8, 64 << 20, link)
    assert best == "ring"
    assert pred["ring"] < pred["tree"] < pred["mesh"] < pred["star"]


def test_choice_switches_with_message_size() -> None:
    link = LinkModel(alpha=1e-3, beta=1e-9)  # 1 ms, 1 GB/s: crossover in the megabytes
    assert choose(8, 1 << 10, link)[0] == "mesh"
    assert choose(8, 1 << 30, link)[0] == "ring"


def test_predictions_follow_the_formulas() -> None:
    link = LinkModel(alpha=2.0, beta=0.5, gamma=0.25)
    n, m = 4, 8
    assert predict("star", n, m, link) == 2 * 2.0 + 2 * 3 * m * 0.5 + 3 * m * 0.25
    assert predict("ring", n, m, link) == 2 * 3 * 2.0 + 2 * 3 / 4 * m * 0.5 + 3 / 4 * m * 0.25
    assert predict("mesh", n, m, link) == 2.0 + 3 * m * 0.5 + 3 * m * 0.25
    assert predict("tree", n, m, link) == 2 * (2.0 + m * 0.5 + m * 0.25)
    assert [tree_rounds(k) for k in range(1, 9)] == [0, 1, 3, 2, 4, 4, 4, 3]
    assert predict("ring", 1, m, link) == 0 and predict("star", 8, 0, link) == 0
    with pytest.raises(ValueError):
        predict("mpi", n, m, link)


# Wire formats as allreduce.probe_codecs measures them here (roughly): fp16 and int8 cost time to encode.
WIRES = {"fp32": WireCost(4.0), "fp16": WireCost(2.0, 5e-9, 5e-9), "int8": WireCost(1.125, 20e-9, 2e-9)}


def test_wire_bytes_scale_the_message_terms_only() -> None:
    link = LinkModel(alpha=1e-3, beta=1e-8, gamma=1e-10)
    values = 8192
    fp32, int8 = (predict_wire("star", 8, values, link, WIRES[w]) for w in ("fp32", "int8"))
    assert fp32 == pytest.approx(predict("star", 8, 4 * values, link))
    # messages at 1.125 / 4 of the bytes, the sums still over float32, plus 2 encodes and 8 decodes
    messages = predict("star", 8, int(values * 1.125), LinkModel(1e-3, 1e-8))
    sums = 7 * 4 * values * 1e-10
    assert int8 == pytest.approx(messages + sums + values * (2 * 20e-9 + 8 * 2e-9))


def test_lossy_wire_only_where_the_bytes_cost_more_than_encoding() -> None:
    # The paper's links (1 ms, 300 Mbit/s), one token of Llama 2-70B (8192 values) on 8 devices: int8
    (algo, wire), pred = choose_wire(8, 8192, LinkModel(1e-3, 8 / 300e6), WIRES)
    assert wire == "int8" and pred[algo, "int8"] < pred[algo, "fp16"] < pred[algo, "fp32"]
    # Shared memory (10 us, 10 GB/s): encoding costs more than the bytes it saves: fp32
    assert choose_wire(8, 8192, LinkModel(10e-6, 1e-10), WIRES)[0][1] == "fp32"
    # One value: int8's 4-byte scale makes it bigger than fp16 (5 bytes against 2)
    assert choose_wire(2, 1, LinkModel(1e-3, 8 / 1e6), WIRES)[0][1] == "fp16"
