"""Hand checks of eval's measurements on inputs whose answer is known."""

import numpy as np
import pytest

from streamgen.eval.evaluators import HOP, log_mel


@pytest.mark.parametrize("m", [3, 6, 40])
def test_a_mel_frame_is_centred_where_log_mel_says(m):
    # a click halfway between the centres log_mel gives frames m and m + 1 lands in both alike, and
    # a click at a centre in that frame more than its neighbours
    centre = m * HOP + 96
    audio = np.zeros(16000, np.float32)
    audio[centre + HOP // 2] = 1.0
    energy = log_mel(audio, 25).exp().sum(0).numpy()
    assert energy[m] == pytest.approx(energy[m + 1], rel=1e-4)
    audio[:] = 0
    audio[centre] = 1.0
    energy = log_mel(audio, 25).exp().sum(0).numpy()
    assert energy[m] > 1.5 * max(energy[m - 1], energy[m + 1])
    assert energy[m - 1] == pytest.approx(energy[m + 1], rel=1e-4)
