"""Fleet fine-tuning (edgetrain.fleet): the update codec, partitions and reply checks on their own, then
federations of simulated boards (skipped, with the reason, without Flower).

One federation runs in Flower's simulation runtime (Ray): 3 clients, 4 rounds, client 1 under its own precision
policy (DFQ); rounds 1-2 are clean (the issue's 2-round check), faulty clients act in rounds 3 and 4. The same
federation then runs in this process (edgetrain.fleet.inprocess: the same server loop and ClientApp without Ray),
stopped after round 2 and resumed: its final weights must equal the simulation's bit for bit, so the resume check
covers rejected replies too. Ray's start-up (about 20 s here) is paid once.
"""
from __future__ import annotations

import importlib.util
import json
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.cli.demo import demo_model_path
from edgetrain.errors import EdgetrainError
from edgetrain.fleet import codec
from edgetrain.fleet.partitions import class_shares, client_split, partition_indices
from edgetrain.fleet.settings import FleetSettings
from edgetrain.fleet.validate import RejectedReply, check_layout, decode_checked, max_wire_bytes
from edgetrain.quant import qrange
from edgetrain.train.checkpoint import load_checkpoint

HAVE_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="Flower is not installed: pip install 'edgetrain[fleet]'")
FAULTS = "1:nan:3,2:shape:4,0:dtype:4"  # rounds 1-2 stay clean
TRAIN = {"schedule": "static", "bits": "8/8", "lr": 0.02, "momentum": 0.9, "batch_size": 32}
# A heterogeneous fleet: client 1 is a slower board training under DFQ at a low cost target, the others static 8/8.
POLICIES = {"1": {"schedule": "dfq", "dfq_target": 3.0}}


# -- codec --------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=4), bits=st.integers(2, 16),
       seed=st.integers(0, 2**31), magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
def test_codec_round_trip_within_one_step(shape, bits, seed, magnitude):
    """Decoded deltas lie within one quantisation step of the originals; the bytes are the arrays' nbytes."""
    rng = np.random.default_rng(seed)
    deltas = {"w": (rng.standard_normal(shape) * magnitude).astype(np.float32),
              "b": (rng.standard_normal(3) * magnitude).astype(np.float32)}
    wire = codec.encode(deltas, bits, seed=seed, round=1, client=2)
    layout = codec.wire_layout({k: v.shape for k, v in deltas.items()}, bits)
    assert {k: (v.dtype, v.shape) for k, v in wire.items()} == layout
    assert codec.payload_bytes(wire) == sum(a.nbytes for a in wire.values())
    assert all(np.abs(wire[k + ".q"]).max(initial=0) <= qrange(bits)[1] for k in deltas)
    back = codec.decode(wire, {k: v.shape for k, v in deltas.items()}, bits)
    for k, d in deltas.items():
        scale = wire[k + ".scale"]
        step = scale.reshape((-1,) + (1,) * (d.ndim - 1)) if scale.ndim else scale
        assert back[k].shape == d.shape and back[k].dtype == np.float32
        assert np.all(np.abs(back[k] - d) <= step * (1 + 1e-6))
    again = codec.encode(deltas, bits, seed=seed, round=1, client=2)
    assert all(np.array_equal(again[k], wire[k]) for k in wire)  # seeded: the same bytes


def test_codec_sizes_and_fp32():
    """8 bits: a quarter of fp32's bytes plus one float32 scale per output channel; fp32 round-trips exactly."""
    d = {"conv.w": np.random.default_rng(0).standard_normal((16, 6, 5, 5)).astype(np.float32)}
    q8 = codec.encode(d, 8, seed=0, round=1, client=0)
    assert q8["conv.w.q"].dtype == np.int8 and q8["conv.w.scale"].shape == (16,)
    assert codec.payload_bytes(q8) == d["conv.w"].size + 16 * 4
    assert codec.encode(d, 12, seed=0, round=1, client=0)["conv.w.q"].dtype == np.int16
    f = codec.encode(d, None, seed=0, round=1, client=0)
    assert np.array_equal(codec.decode(f, {"conv.w": (16, 6, 5, 5)}, None)["conv.w"], d["conv.w"])
    other = codec.encode(d, 8, seed=0, round=1, client=1)  # another client draws other rounding
    assert not np.array_equal(other["conv.w.q"], q8["conv.w.q"])


# -- partitions -----------------------------------------------------------------------------------
def test_partitions_cover_every_sample_once_and_are_seeded():
    y = np.repeat(np.arange(10), 50)
    for partition in ("iid", "dirichlet:0.3"):
        shares = class_shares(10, 4, partition, seed=7)
        parts = partition_indices(y, shares, seed=7)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
        again = partition_indices(y, class_shares(10, 4, partition, seed=7), seed=7)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    iid = partition_indices(y, class_shares(10, 4, "iid", 0), 0)
    assert sorted(len(p) for p in iid) == [125, 125, 125, 125]
    skew = partition_indices(y, class_shares(10, 4, "dirichlet:0.1", 0), 0)
    # label skew: some client's most common class is far above the 10% of an even mix
    assert max(np.bincount(y[p], minlength=10).max() / max(len(p), 1) for p in skew) > 0.3


def test_client_split_uses_one_share_matrix_for_train_and_test():
    from edgetrain.data import load_data

    split = load_data("digits")
    parts = [client_split(split, c, 3, "dirichlet:0.5", 1) for c in range(3)]
    assert sum(len(p.train) for p in parts) == len(split.train)
    assert sum(len(p.test) for p in parts) == len(split.test)
    shares = class_shares(10, 3, "dirichlet:0.5", 1)
    top = int(np.argmax(shares[:, 0]))  # client 0's largest class share shows in both of its arrays
    assert np.bincount(parts[0].train.y, minlength=10)[top] > 0 and np.bincount(parts[0].test.y, minlength=10)[top] > 0


# -- reply checks ----------------------------------------------------------------------------------
def _wire(arrays):
    """Stand-ins for Flower Arrays: dtype, shape and the serialised bytes' length."""
    return {k: types.SimpleNamespace(dtype=str(v.dtype), shape=list(v.shape), data=b"\0" * (v.nbytes + 128))
            for k, v in arrays.items()}


def test_reply_checks_reject_shape_dtype_size_and_nan():
    shapes = {"w": (4, 3), "b": (4,)}
    layout = codec.wire_layout(shapes, 8)
    good = codec.encode({"w": np.ones((4, 3), np.float32), "b": np.ones(4, np.float32)}, 8, seed=0, round=1,
                        client=0)
    limit = max_wire_bytes(layout, 1.5)
    assert check_layout(_wire(good), layout, limit) == sum(a.nbytes + 128 for a in good.values())
    for bad, reason in ((dict(good, **{"w.q": good["w.q"].reshape(3, 4)}), "shape"),
                        (dict(good, **{"w.q": good["w.q"].astype(np.int16)}), "dtype"),
                        ({k: v for k, v in good.items() if k != "b.q"}, "wrong arrays")):
        with pytest.raises(RejectedReply, match=reason):
            check_layout(_wire(bad), layout, limit)
    with pytest.raises(RejectedReply, match="oversized"):
        check_layout({**_wire(good), "w.q": types.SimpleNamespace(dtype="int8", shape=[4, 3], data=b"\0" * limit)},
                     layout, limit)
    with pytest.raises(RejectedReply, match="NaN"):
        decode_checked(dict(good, **{"w.scale": np.full(4, np.nan, np.float32)}), shapes, 8)


# -- FedProx's term, on one client without Flower ----------------------------------------------------
@needs_flwr
def test_fedprox_term_pulls_a_client_towards_the_global_weights(tmp_path):
    """The proximal gradient mu (w - w_global) reaches the optimizer: with a large mu the round moves less."""
    from edgetrain.fleet.local import train_round
    from edgetrain.fleet.server import Federation

    fleet = _settings(tmp_path, fault="", update_bits="fp32", local_steps=4)
    start = Federation(fleet, report=lambda text: None).global_state()
    moved = {}
    for mu in (0.0, 50.0):
        result = train_round(fleet, client=0, round=1, global_state=start, proximal_mu=mu)
        deltas = codec.decode(result.arrays, {k: v.shape for k, v in start.items()}, None)
        moved[mu] = float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in deltas.values())))
    assert 0 < moved[50.0] < 0.8 * moved[0.0], moved


# -- per-client precision policies --------------------------------------------------------------------
def _lenet_latency_table(path, slow: float = 1.0) -> str:
    """A latency table, as `edgetrain profile --latency-table` writes it, for every MAC layer of the demo LeNet-5 at
    fp32 and at each default DFQ candidate (weights 4 bits)."""
    from edgetrain.model import load
    from edgetrain.precision.dfq.config import DEFAULT_CANDIDATES

    layers = [n.name for n in load(demo_model_path()).graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
    bits = {"fp32": 32.0, **{f"{c}:w4": float(c.split("/")[0]) for c in DEFAULT_CANDIDATES if c != "0"}}
    table = {layer: {p: {"forward_s": slow * b * 1e-5, "backward_s": slow * b * 2e-5} for p, b in bits.items()}
             for layer in layers}
    path.write_text(json.dumps(table))
    return str(path)


def test_client_policies_merge_validate_and_name_the_client(tmp_path):
    """A policy naming a schedule replaces the run's precision settings; others overlay it; the SuperNode's own
    policy wins; mistakes are one line naming the client."""
    from edgetrain.errors import EdgetrainError

    table = _lenet_latency_table(tmp_path / "board2.json")
    fleet = _settings(tmp_path, client_policies=json.dumps(
        {"0": {"schedule": "fractrain", "fractrain_targets": [2.0, 3.0]}, "1": {"bits": "4/8"},
         "2": {"schedule": "dfq", "dfq_target": 3.0, "latency_table": table}}))
    fleet.check()
    configs = {c: fleet.train_config(policy=fleet.policy_for(c)) for c in range(3)}
    assert configs[0].schedule == "fractrain" and configs[0].bits is None and configs[0].lr == TRAIN["lr"]
    assert configs[1].schedule == "static" and configs[1].bits == "4/8"
    assert configs[2].dfq_cost_table == table
    assert fleet.policy_for(1, '{"bits": "6/8"}') == {"bits": "6/8"}  # a SuperNode's node config wins
    assert fleet.policy_for(2, None)["dfq_cost_table"] == table
    for policies, message in (({"5": {}}, "client 5 is not one of 0..2"), ({"x": {}}, "not a client id"),
                              ({"0": {"steps": 9}}, "may not set steps"), ({"0": {"colour": 1}}, "colour"),
                              ({"1": {"schedule": "dfq", "dfq_target": 300.0}}, "client 1")):
        with pytest.raises(EdgetrainError, match=message):
            _settings(tmp_path, client_policies=json.dumps(policies)).check()


@needs_flwr
def test_a_client_with_a_latency_table_trains_at_its_own_cost(tmp_path):
    """One round of two clients from the same global model: the board with a measured latency table and a DFQ
    target spends fewer BitOPs than a static 8/8 one, and its update has the global model's layout."""
    from edgetrain.fleet.local import preflight, train_round
    from edgetrain.fleet.server import Federation

    table = _lenet_latency_table(tmp_path / "slow-board.json", slow=3.0)
    fleet = _settings(tmp_path, fault="", local_steps=2, client_policies=json.dumps(
        {"2": {"schedule": "dfq", "dfq_target": 3.0, "latency_table": table}}))
    preflight(fleet)
    start = Federation(fleet, report=lambda text: None).global_state()
    static, slow = (train_round(fleet, client=c, round=1, global_state=start) for c in (0, 2))
    assert slow.metrics["policy"] == 1 and static.metrics["policy"] == 0
    assert 0 < slow.metrics["bitops"] < static.metrics["bitops"]
    assert {k: (v.dtype, v.shape) for k, v in slow.arrays.items()} == {k: (v.dtype, v.shape)
                                                                       for k, v in static.arrays.items()}


def test_a_gated_client_sends_statistics_re_estimated_at_full_depth(tmp_path):
    """A client training under a DFQ policy with skipping re-estimates its BatchNorm statistics at full depth
    before it sends them (the global model runs every block); with --dfq-recalibration-batches 0 it sends the
    gated ones. Weights are the same either way: only the statistics differ."""
    import onnx

    import models
    from edgetrain.fleet.local import train_round
    from edgetrain.fleet.server import Federation

    model = tmp_path / "resnet8.onnx"
    onnx.save(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=28, width=4, seed=0), model)
    policy = {"schedule": "dfq", "dfq_candidates": ["0", "8/8"], "dfq_weight_bits": 8}
    updates = {}
    for batches in (3, 0):
        policies = json.dumps({"1": {**policy, "dfq_recalibration_batches": batches}})
        fleet = _settings(tmp_path / str(batches), model=str(model), fault="", local_steps=2, client_policies=policies)
        start = Federation(fleet, report=lambda text: None).global_state()
        updates[batches] = train_round(fleet, client=1, round=1, global_state=start).arrays
    stats = [k for k in updates[0] if "running_" in k]
    weights = [k for k in updates[0] if k.endswith("weight.q")]
    assert stats and weights
    assert any(not np.array_equal(updates[3][k], updates[0][k]) for k in stats)
    assert all(np.array_equal(updates[3][k], updates[0][k]) for k in weights)


@needs_flwr
def test_a_client_round_carries_no_state_from_earlier_rounds(tmp_path):
    """A round builds the client's model, optimizer (momentum from zero), precision controller and DFQ gates afresh
    from the global tensors: computed after other rounds in the same process, it equals the same round computed with
    the process's caches emptied, bit for bit (a cached data split mutated by training would show here)."""
    from edgetrain.fleet import local
    from edgetrain.fleet.server import Federation

    fleet = _settings(tmp_path, fault="", local_steps=2)  # client 1 trains under its own DFQ policy
    start = Federation(fleet, report=lambda text: None).global_state()
    for rnd in (1, 2):
        after = local.train_round(fleet, client=1, round=rnd, global_state=start)
    local.load_split.cache_clear()
    local.model_normalizes_cached.cache_clear()
    fresh = local.train_round(fleet, client=1, round=2, global_state=start)
    assert after.arrays.keys() == fresh.arrays.keys()
    assert all(np.array_equal(after.arrays[k], fresh.arrays[k]) for k in after.arrays)
    timing = {"wall-seconds", "peak-memory-bytes"}
    assert {k: v for k, v in after.metrics.items() if k not in timing} == \
        {k: v for k, v in fresh.metrics.items() if k not in timing}


# -- simulations ------------------------------------------------------------------------------------
def _settings(out, **kw) -> FleetSettings:
    values = dict(model=demo_model_path(), data="digits", clients=3, rounds=4, local_steps=3, seed=3,
                  update_bits="8", out=str(out), train=json.dumps(TRAIN), export=False, fault=FAULTS,
                  client_policies=json.dumps(POLICIES))
    values.update(kw)
    return FleetSettings(**values)


def _rounds(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    """Run the module's federations once: 4 rounds in Flower's simulation runtime ("sim"), and the same federation
    in this process stopped at 2 of 4 then resumed ("a")."""
    if not HAVE_FLWR:
        pytest.skip("Flower is not installed: pip install 'edgetrain[fleet]'")
    from edgetrain.fleet.inprocess import run_inprocess
    from edgetrain.fleet.simulate import simulate

    root = tmp_path_factory.mktemp("fleet")
    runs = {}
    runs["sim"] = simulate(_settings(root / "sim"), actors=1)
    runs["stopped"] = run_inprocess(_settings(root / "a", stop_after=2))
    runs["after_stop"] = _rounds(root / "a")
    runs["ckpt2"] = load_checkpoint(root / "a" / "ckpt-000002.npz")
    runs["resumed"] = run_inprocess(_settings(root / "a", export=True), resume=True)
    return root, runs


@needs_flwr
def test_two_rounds_change_the_model_log_accuracy_and_count_bytes(federations):
    """3 clients, static 8/8, 8-bit updates: rounds 1-2 in the simulation runtime (and their in-process twins)."""
    from edgetrain.model import load

    root, runs = federations
    assert runs["sim"]["rounds"] == [1, 2, 3, 4] and not runs["sim"]["stopped"]
    rounds = _rounds(root / "sim")[:2]
    assert [r["round"] for r in rounds] == [1, 2]
    initial = load(demo_model_path()).parameters()
    for ckpt in (runs["ckpt2"], load_checkpoint(root / "sim" / "ckpt-000004.npz")):
        assert any(not np.array_equal(initial[n], ckpt.params[n]) for n in initial)  # the global model changed
    assert rounds[1]["loss"] != rounds[0]["loss"]  # and it changed in round 2 as well
    shapes = {n: a.shape for n, a in {**runs["ckpt2"].params, **runs["ckpt2"].buffers}.items()}
    per_client = sum(np.dtype(dt).itemsize * int(np.prod(shape)) for dt, shape in codec.wire_layout(shapes, 8).values())
    fp32 = sum(4 * int(np.prod(s)) for s in shapes.values())
    for r in rounds:
        assert 0.5 < r["accuracy"] <= 1.0 and np.isfinite(r["loss"])  # central accuracy, logged each round
        assert r["accepted"] == 3 and r["rejected"] == []
        assert r["uplink_bytes"] == 3 * per_client == sum(c["update-bytes"] for c in r["clients"])
        assert r["downlink_bytes"] == 3 * fp32
        assert r["uplink_bytes"] < 0.3 * r["downlink_bytes"]  # 8 bits: about a quarter of fp32
        assert all(c["bitops"] > 0 and c["peak-memory-bytes"] > 0 for c in r["clients"])
        # client 1's own policy (DFQ at a low target): the server sees it train cheaper than the static boards
        costs = {c["client"]: c for c in r["costs"]}
        assert sorted(costs) == [0, 1, 2] and [costs[c]["own_policy"] for c in range(3)] == [False, True, False]
        assert costs[1]["bitops"] < min(costs[0]["bitops"], costs[2]["bitops"])
        assert all(c["wall_seconds"] > 0 and 0 < c["bitops_percent"] < 100 for c in costs.values())


@needs_flwr
def test_resumed_federation_is_bit_identical_to_an_unstopped_one(federations):
    """Stopped after round 2 and resumed (in this process) ends with the simulation's weights, bit for bit."""
    root, runs = federations
    assert runs["stopped"]["stopped"] and runs["stopped"]["rounds"] == [1, 2]
    assert [r["round"] for r in runs["after_stop"]] == [1, 2]
    assert runs["resumed"]["rounds"] == [1, 2, 3, 4] and not runs["resumed"]["stopped"]
    a, b = load_checkpoint(root / "a" / "ckpt-000004.npz"), load_checkpoint(root / "sim" / "ckpt-000004.npz")
    assert a.params.keys() == b.params.keys() and a.buffers.keys() == b.buffers.keys()
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.params)
    assert all(np.array_equal(a.buffers[n], b.buffers[n]) for n in a.buffers)
    for x, y in zip(_rounds(root / "a"), _rounds(root / "sim"), strict=True):
        assert (x["accuracy"], x["loss"], x["uplink_bytes"]) == (y["accuracy"], y["loss"], y["uplink_bytes"])
        # rejections are logged in arrival order, which Ray does not fix
        assert sorted(map(json.dumps, x["rejected"])) == sorted(map(json.dumps, y["rejected"]))
    checks = runs["resumed"]["export"]["onnxruntime"]  # the final model in onnxruntime, float and int8
    assert checks["float"]["top1_agreement"] == 1.0 and checks["int8"]["top1_agreement"] >= 0.98


@needs_flwr
def test_bad_replies_are_left_out_and_rounds_complete(federations):
    """In the simulation runtime: NaN in round 3, a wrong shape and a wrong dtype in round 4, each left out."""
    root, runs = federations
    rounds = _rounds(root / "sim")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert [r["accepted"] for r in rounds] == [3, 3, 2, 1]
    assert [x["client"] for x in rounds[2]["rejected"]] == [1] and "NaN" in rounds[2]["rejected"][0]["reason"]
    reasons = {x["client"]: x["reason"] for x in rounds[3]["rejected"]}
    assert "shape" in reasons[2] and "dtype" in reasons[0]
    assert all(np.isfinite(r["accuracy"]) and r["accuracy"] > 0.5 for r in rounds)
    assert rounds[2]["uplink_bytes"] == sum(c["update-bytes"] for c in rounds[2]["clients"])  # NaN: same size


def test_plot_of_a_federation_folder(tmp_path):
    """edgetrain plot DIR on a federation folder draws accuracy and bytes per round."""
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'edgetrain[plot]'")
    from edgetrain.cli.plot import plot_run

    rows = [{"round": r, "accuracy": 0.9 + r / 100, "uplink_bytes": 1000, "downlink_bytes": 4000, "update_bits": "8"}
            for r in (1, 2)]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_run(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["federation.png"]
    assert (tmp_path / "federation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["federate", "--demo", "--partition", "dirichlet:0"], "positive alpha"),
    (["federate", "--demo", "--update-bits", "17"], "2..16"),
    (["federate", "--demo", "--fault", "1:melt"], "KIND"),
    (["federate", "--demo", "--strategy", "fedavgm", "--server-momentum", "1.0"], "must be in [0, 1)"),
    (["federate", "--demo", "--schedule", "static", "--bits", "8/8", "--freeze", "nothing*"], "matches no parameter"),
    (["federate", "--demo", "--client-policies", '{"7": {"bits": "4/8"}}'], "client 7 is not one of 0..2"),
])
def test_federate_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    """Mistakes in the flags stop before any simulation starts: one `edgetrain: error:` line, exit 2."""
    from edgetrain.cli.main import main

    if ("freeze" in " ".join(argv) or "client-policies" in argv or "fedavgm" in argv) and not HAVE_FLWR:
        pytest.skip("this check runs after the Flower check")
    code = main(argv + ["--out", str(tmp_path / "f")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("edgetrain: error:") and message in err[0]


@needs_flwr
def test_fedavgm_momentum_is_checkpointed_and_a_resumed_federation_is_bit_identical(tmp_path):
    """FedAvgM (in this process, 2 clients, 2 rounds): its server momentum buffer is in each round's checkpoint, the
    step follows it (w_r = w_{r-1} - buffer_r at the server lr of 1), and a federation stopped after round 1 and
    resumed ends with the unstopped one's weights and buffer, bit for bit; plain FedAvg ends elsewhere."""
    from edgetrain.fleet.inprocess import run_inprocess
    from edgetrain.fleet.server import MOMENTUM

    kw = dict(clients=2, rounds=2, local_steps=1, fault="", client_policies="{}", strategy="fedavgm")
    run_inprocess(_settings(tmp_path / "whole", **kw))
    run_inprocess(_settings(tmp_path / "part", stop_after=1, **kw))
    assert load_checkpoint(tmp_path / "part" / "ckpt-000001.npz").optimizer_state  # round 1's buffer, saved
    run_inprocess(_settings(tmp_path / "part", **kw), resume=True)
    run_inprocess(_settings(tmp_path / "plain", **{**kw, "strategy": "fedavg"}))
    whole1, whole2, part2, plain2 = (load_checkpoint(tmp_path / d / f"ckpt-00000{r}.npz") for d, r in
                                     (("whole", 1), ("whole", 2), ("part", 2), ("plain", 2)))
    names = sorted(n for n, a in {**whole2.params, **whole2.buffers}.items() if a.dtype.kind == "f")
    buf = {n: whole2.optimizer_state[f"{MOMENTUM}/{n}"] for n in names}
    assert all(np.array_equal(buf[n], part2.optimizer_state[f"{MOMENTUM}/{n}"]) for n in names)
    assert all(np.array_equal(whole2.params[n], part2.params[n]) for n in whole2.params)
    before, after = ({**c.params, **c.buffers} for c in (whole1, whole2))
    assert any(np.abs(buf[n]).max() > 1e-4 for n in names)
    for n in names:
        np.testing.assert_allclose(after[n], before[n] - buf[n], rtol=0, atol=1e-5)
    assert any(not np.allclose(whole2.params[n], plain2.params[n], atol=1e-4) for n in whole2.params)


@needs_flwr
@pytest.mark.parametrize("strategy, first, second", [("fedavgm", 22.0, 33.0), ("fedtrimmedavgm", 3.0, 4.5)])
def test_server_momentum_steps_on_the_mean_or_the_trimmed_mean(strategy, first, second):
    """Five clients send weights 1, 2, 3, 4 and 100 twice from 0, server momentum 0.5: FedAvgM steps to the mean
    (22), then on by half its last step (33); FedTrimmedAvgM to the mean of 2..4 without the outliers (3), then 4.5."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from edgetrain.fleet.server import make_strategy

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as InProcessGrid
    s = make_strategy(FleetSettings(model=demo_model_path(), clients=5, strategy=strategy, server_momentum=0.5))
    s.current_arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})  # what configure_train would keep
    steps = []
    for rnd in (1, 2):
        replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, v, np.float32))}),
                                       "metrics": MetricRecord({"num-examples": 1})}),
                           reply_to=Message(RecordDict(), dst_node_id=v, message_type="train"))
                   for v in (1, 2, 3, 4, 100)]
        arrays, _ = s.aggregate_train(rnd, replies)
        steps.append(arrays["w"].numpy())
    np.testing.assert_allclose(steps, [np.full(3, first), np.full(3, second)], rtol=1e-6)


@needs_flwr
def test_resume_takes_an_older_checkpoint_without_a_newer_setting(tmp_path, monkeypatch):
    """A checkpoint written before server-momentum existed resumes (the missing setting counts as its default);
    one written under another seed does not, and the error names the setting."""
    from edgetrain.fleet import server

    fleet = _settings(tmp_path, fault="", client_policies="{}")
    comparable = server._comparable
    monkeypatch.setattr(server, "_comparable",
                        lambda s: {k: v for k, v in comparable(s).items() if k != "server-momentum"})
    server.Federation(fleet, report=lambda text: None)._checkpoint(1)  # as an older edgetrain wrote it
    monkeypatch.undo()
    resumed = server.Federation(fleet, resume=True, report=lambda text: None)
    resumed._prepare_folder()
    assert resumed.first_round == 2
    with pytest.raises(EdgetrainError, match=r"other settings \(seed\)"):
        server.Federation(_settings(tmp_path, fault="", client_policies="{}", seed=4), resume=True,
                          report=lambda text: None)._prepare_folder()
