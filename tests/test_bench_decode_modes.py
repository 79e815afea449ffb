"""bench/decode_modes.py: both arms run on one session, switched round by round, and it prints one
JSON object of their medians and ratios."""

import json

from bench import decode_modes
from streamgen.model.vae import TinyCausalVAE


def test_it_times_both_ways_of_decoding_round_by_round(monkeypatch, two_threads):
    parts = []
    decode_frames = TinyCausalVAE._decode_frames

    def recording(self, mixed, frame_threads):
        parts.append(frame_threads)
        return decode_frames(self, mixed, frame_threads)

    monkeypatch.setattr(TinyCausalVAE, "_decode_frames", recording)
    result = decode_modes.main(["--model", "debug", "--height", "32", "--width", "32", "--rounds", "2",
                                "--chunks", "1"])  # fmt: skip
    json.dumps(result)
    assert result["threads"] == 2 and result["rounds"] == 2 and len(result["load_average_after"]) == 3
    for part in ("decode", "chunk"):
        assert set(result[part]["ms_median"]) == {"split", "frames"}
        assert all(ms > 0 for ms in result[part]["ms_median"].values())
        rounds = result[part]["speedup_rounds"]
        assert result[part]["speedup"] > 0 and len(rounds["ratios"]) == 2
        assert rounds["min"] <= rounds["median"] <= rounds["max"]
    # each arm's warm-up chunk, then a chunk of each a round, in alternating order: split's
    # convolutions over the threads (the ring's filling before, too), frames' frames side by side
    assert parts.count(2) == 3 and parts[-6:] == [1, 2, 1, 2, 2, 1]
