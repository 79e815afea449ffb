"""The benchmarks' arms in a balanced order (bench/rounds.py), and the ratios they report from it,
under stubbed clocks: a load that rises steadily through the rounds must hit every arm alike."""

import types

import pytest

from bench.rounds import balanced_order, ratio_rounds


class DriftingClock:
    """perf_counter for loops of `t = clock(); work(); clock() - t`: the i-th span timed lasts
    1 + i, whatever ran in it (a load that rises steadily through the run, the arms equally fast)."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def __call__(self) -> float:
        if self.calls % 2:
            self.now += 1 + self.calls // 2
        self.calls += 1
        return self.now


def drifting(monkeypatch, module) -> DriftingClock:
    clock = DriftingClock()
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock))
    return clock


def test_the_order_reverses_every_other_round_so_each_arm_has_the_same_mean_place():
    order = list(balanced_order("ABC", 4))
    assert [arm for _, arm in order] == list("ABCCBAABCCBA")
    assert [r for r, _ in order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    places = {arm: [i for i, (_, a) in enumerate(order) if a == arm] for arm in "ABC"}
    assert {sum(p) for p in places.values()} == {22}


def test_round_ratios_their_median_and_spread():
    got = ratio_rounds([2.0, 3.0, 9.0], [1.0, 2.0, 3.0])
    assert got == {"ratios": [2.0, 1.5, 3.0], "median": 2.0, "min": 1.5, "max": 3.0}
    assert ratio_rounds([1.0], [3.0]) == {"ratios": [0.333], "median": 0.333, "min": 0.333, "max": 0.333}
    with pytest.raises(ValueError, match="ratios of 2 and 1 rounds"):
        ratio_rounds([1.0, 2.0], [1.0])


def test_decoder_variants_take_turns_so_a_drift_favours_none(monkeypatch):
    # every variant equally fast on a machine that slows steadily: the order A B C D, A B C D gave
    # the last one the slowest spans of each round (a "speedup" of 0.5 for autocast_bfloat16)
    import bench.decoder as decoder

    drifting(monkeypatch, decoder)
    vae, _ = decoder._load_tiny_vae("debug")
    size = decoder.measure_size(vae, 32, 1, rounds=2, compile=False)
    names = ("upsample_then_conv", "phase_conv", "bfloat16", "autocast_bfloat16")
    assert {size[name]["speedup"] for name in names} == {1.0}
    # spans 1 2 3 4 (in this order), then 5 6 7 8 in the reverse one: phase_conv's rounds took 2
    # and 7 against the reference's 1 and 8
    assert size["phase_conv"]["speedup_rounds"] == {"ratios": [0.5, 1.143], "median": 0.821, "min": 0.5, "max": 1.143}
    assert size["upsample_then_conv"]["speedup_rounds"]["ratios"] == [1.0, 1.0]
    encode = size["reference_encode"]
    assert encode["bfloat16_speedup"] == 1.0 and len(encode["bfloat16_speedup_rounds"]["ratios"]) == 2


def test_kept_kv_reports_each_rounds_ratio(monkeypatch):
    # its arms alternated already; the ratio of medians alone hid how far the rounds spread
    from bench import kept_kv
    from streamgen.model.model import Block

    drifting(monkeypatch, kept_kv)
    arms = []
    got = kept_kv.alternating(lambda: arms.append(Block.kept_kv is kept_kv._KEPT_KV), 1, 1, 2)
    assert arms == [True, False, False, True]
    assert got["ms_per_session_chunk"] == {"kept": 2500.0, "every_forward": 2500.0} and got["speedup"] == 1.0
    assert got["speedup_rounds"] == {"ratios": [2.0, 0.75], "median": 1.375, "min": 0.75, "max": 2.0}


def test_the_decoders_default_rounds_balance_its_medians(monkeypatch):
    # 7 rounds: each variant's median was its time in the middle round alone, whose order favoured
    # the variant timed first (under a steady drift autocast_bfloat16 came out 1.231x, bfloat16
    # 1.143x and phase_conv 1.067x)
    import argparse

    import bench.decoder as decoder

    parser = argparse.ArgumentParser()
    decoder.add_arguments(parser)
    rounds = parser.parse_args([]).rounds
    drifting(monkeypatch, decoder)
    vae, _ = decoder._load_tiny_vae("debug")
    size = decoder.measure_size(vae, 32, 1, rounds=rounds, compile=False)
    assert {size[name]["speedup"] for name in ("phase_conv", "bfloat16", "autocast_bfloat16")} == {1.0}
    assert size["reference_encode"]["bfloat16_speedup"] == 1.0


def test_the_wan_reference_encodes_take_turns(monkeypatch):
    # diffusers' way before the 2D one in each of 3 rounds: spans 1 3 5 against 2 4 6, a 2D way
    # as fast as diffusers' came out 1.33x slower
    import torch

    from bench import wan_decoder

    class Encoder:
        single_frame_2d = False

        def encode_reference(self, image):
            return image.mean() + (1e-3 if self.single_frame_2d else 0.0)

    drifting(monkeypatch, wan_decoder)
    got = wan_decoder.reference_encode_ways(Encoder(), 8, 8, torch.device("cpu"), torch.float32)
    assert got["diffusers"]["ms_p50"] == got["single_frame_2d"]["ms_p50"] == 4500.0
    assert got["single_frame_2d"]["speedup"] == 1.0 and got["single_frame_2d"]["max_abs_diff"] == 0.001
    assert got["single_frame_2d"]["speedup_rounds"]["ratios"] == [0.5, 1.333, 0.833, 1.143]


def test_against_speedup_is_the_ratio_of_the_medians_not_of_their_rounded_ms(monkeypatch):
    # spans of (1 + i)^2 hundredths of a ms: phase_conv's median 0.625 ms, against's 0.445, printed
    # 0.6 and 0.4, whose ratio 1.5 was the against_speedup
    import bench.decoder as decoder

    class Squares(DriftingClock):  # the i-th span lasts (1 + i)^2 units
        def __call__(self):
            if self.calls % 2:
                self.now += (1 + self.calls // 2) ** 2
            self.calls += 1
            return self.now * 1e-5

    monkeypatch.setattr(decoder, "time", types.SimpleNamespace(perf_counter=Squares()))
    vae, _ = decoder._load_tiny_vae("debug")
    other, _ = decoder._load_tiny_vae("debug")
    size = decoder.measure_size(vae, 32, 1, rounds=2, compile=False, against=other)
    assert (size["phase_conv"]["ms_median"], size["against"]["ms_median"]) == (0.6, 0.4)
    assert size["against_speedup"] == {"float32": round(62.5 / 44.5, 3), "bfloat16": round(54.5 / 42.5, 3)}
