"""Pauses in a session's sound (`AudioTimeline.silent_run`): where a lowered playout delay may
skip without cutting a word. A pause is silence, or, over a noisy microphone, a run at the sound's
own noise floor."""

from __future__ import annotations

import numpy as np

# A pause in the sound: 20 ms whose RMS is below -50 dBFS. espeak-ng's pauses are exact zeros, and
# a microphone's noise floor is below speech; at -40 dBFS a word's quiet onset or fading end
# (-40 to -48 dBFS, 9-14 blocks in 4-7 s of espeak speech in en-us, de, fr, es) counted as
# silence, at -50 dBFS 1-4 blocks did (down to -72 dBFS: the last of a word fading out).
SILENCE_BLOCK = 320
SILENCE_RMS = 10 ** (-50 / 20)
# Over a microphone's noise (above -50 dBFS; white noise at -40 and -30 dBFS under espeak speech
# left no block below it, so no pause was found) a pause is where the sound stays at its own noise
# floor for 280 ms at least: the floor is the 5th percentile of the 20 ms blocks' RMS over the
# last 3 s, a block is at it when its power over 60 ms (it and its neighbours: pink noise's 20 ms
# levels spread 5 dB) is within 3 dB of it. Under espeak speech without pauses (en-us, de, fr, es;
# white, pink and 50 Hz noise at -45 to -30 dBFS; speech at its level and 10 dB below) such runs,
# the quiet parts of words under the noise, were 10 blocks at most (12 with a 3.5 dB margin; the
# floor taken over each whole sentence);
# espeak's pauses between sentences are 16-17 blocks. Not a floor: one above -25 dBFS, or one
# the window's louder blocks (its 90th percentile) are not 12 dB above (steady sound, noise alone,
# or words too close to the noise to tell their quiet parts from it: at 10 dB, with a 4 dB margin,
# 0.28 s of them were taken for a pause). The lowering then waits for REWIND_WAIT chunks, as before.
NOISE_WINDOW_BLOCKS = 150
NOISE_PERCENTILE = 5
NOISE_SMOOTH_BLOCKS = 3
NOISE_MARGIN = 10 ** (3 / 20)
NOISE_FLOOR_MAX = 10 ** (-25 / 20)
NOISE_UNDER_SOUND = 10 ** (12 / 20)
NOISE_PAUSE_BLOCKS = 14


def block_rms(pcm: np.ndarray) -> np.ndarray:
    """The RMS of each SILENCE_BLOCK of `pcm` (whose length is whole blocks)."""
    return np.sqrt(np.mean(pcm.reshape(-1, SILENCE_BLOCK).astype(np.float64) ** 2, axis=1))


def pause_blocks(rms: np.ndarray, behind: int, blocks: int) -> int:
    """How many of the `blocks` blocks after the first `behind` of `rms` are a pause, from the first
    on: each below SILENCE_RMS, or at the noise floor of `rms` in a run of NOISE_PAUSE_BLOCKS at least
    (counted back into the `behind` blocks and on past the `blocks`)."""
    run = _run_length(rms[behind : behind + blocks] < SILENCE_RMS)
    noise = noise_level(rms)
    if noise > SILENCE_RMS:
        k = NOISE_SMOOTH_BLOCKS
        power = np.convolve(np.pad(rms**2, k // 2, mode="edge"), np.ones(k) / k, mode="valid")
        quiet = power < noise**2
        forward = _run_length(quiet[behind:])
        if _run_length(quiet[:behind][::-1]) + forward >= NOISE_PAUSE_BLOCKS:
            run = max(run, min(forward, blocks))
    return run


def _run_length(flags: np.ndarray) -> int:
    """How many of `flags` from the first on are set."""
    return int(np.argmin(flags) if not flags.all() else len(flags))


def noise_level(rms: np.ndarray) -> float:
    """The RMS below which a block is at the noise floor of the blocks `rms` (see NOISE_WINDOW_BLOCKS),
    0 where they show none. Zeros the timeline holds for audio that did not come (a microphone that
    fell behind: AudioTimeline.LIVE_MARGIN at each restart) pull the floor to 0 once they are NOISE_PERCENTILE %
    of the window: no pause is then found over the noise, only in blocks below SILENCE_RMS (the zeros
    themselves), which is the safe direction: speech is never taken for a pause, the lowering waits."""
    if len(rms) == 0:
        return 0.0
    floor, sound = np.percentile(rms, [NOISE_PERCENTILE, 90])
    if floor > NOISE_FLOOR_MAX or sound < floor * NOISE_UNDER_SOUND:
        return 0.0
    return float(floor * NOISE_MARGIN)
