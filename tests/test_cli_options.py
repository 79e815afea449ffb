"""The options of `generate`, `serve` and `bench` that no run could use, refused in one line as they are read."""


import pytest
from cli_helpers import refused


@pytest.mark.parametrize(
    "argv, says",
    [
        # the worker's set_num_threads raised, and the server said "loading the model" for ever
        # (bench server --threads -1 waited on it)
        (["serve", "--threads", "-1"], "argument --threads: '-1' is not a positive whole number"),
        (["bench", "server", "--threads", "0"], "argument --threads: '0' is not a positive"),
        (["bench", "server", "--lanes", "0"], "argument --lanes: '0' is not a positive"),  # (ignored)
        # ran to the end and reported 0 real-time sessions
        (["bench", "server", "--seconds", "0"], "argument --seconds: '0' is not a positive finite number"),
        (["bench", "server", "--seconds", "nan"], "argument --seconds: 'nan' is not a positive finite"),
        # a NaN in the JSON, a division by zero, a floor better than the true one, an IndexError
        (["bench", "floor", "--matmul-tflops", "nan"], "argument --matmul-tflops: 'nan' is not a positive"),
        (["bench", "floor", "--copy-gbps", "0"], "argument --copy-gbps: '0' is not a positive"),
        (["bench", "floor", "--matmul-tflops", "-5"], "argument --matmul-tflops: '-5' is not a positive"),
        (["bench", "floor", "--time", "-2"], "argument --time: '-2' is not a whole number (0 or more)"),
        (["bench", "floor", "--clip-frames", "0"], "argument --clip-frames: '0' is not a positive"),
        (["bench", "floor", "--target-fps", "-3"], "argument --target-fps: '-3' is not a positive"),
        # -1 latent frames timed as -4 frames; 0 took the model's and reported it
        (["bench", "decoder", "--latent-frames", "0"], "argument --latent-frames: '0' is not a positive"),
        (["bench", "gpu", "--steps", "0"], "argument --steps: '0' is not a positive"),  # (ran 4, said 0)
        (["bench", "gpu", "--chunks", "0"], "argument --chunks: '0' is not a positive"),
        (["bench", "wan-decoder", "--threads", "-1"], "argument --threads: '-1' is not a positive"),
        # NaN in the JSON (no chunk timed), a traceback from inside the decoder's convolutions
        (["bench", "wan-decoder", "--chunks", "0"], "argument --chunks: '0' is not a positive"),
        (["bench", "wan-decoder", "--height", "0"], "argument --height: '0' is not a positive"),
        (["bench", "wan-decoder", "--width", "-16"], "argument --width: '-16' is not a positive"),
        # "frame size 17x832 must be a multiple of 8", naming neither option
        (["bench", "wan-decoder", "--height", "17"], "argument --height: 17 is not a multiple of 8"),
        (["bench", "wan-decoder", "--width", "20"], "argument --width: 20 is not a multiple of 8"),
        # the allocator's "can't allocate memory: you tried to allocate 900000000000000 bytes": a traceback
        (["bench", "wan-decoder", "--height", "100000000"], "argument --height: 100000000 is larger than 4096"),
        # every session closed within a second ("no limit", as --peer-timeout 0 is, was the reading);
        # nan: a traceback in the log and a close said to be the client's
        (["serve", "--idle-timeout", "0"], "argument --idle-timeout: '0' is not a positive finite number"),
        (["serve", "--max-duration", "nan"], "argument --max-duration: 'nan' is not a positive finite"),
        (["serve", "--peer-timeout", "1"], "argument --peer-timeout: 1 s would cut live viewers"),
        # torch's OpenMP pool crashed the process (a segmentation fault, no message)
        (["bench", "engine", "--threads", "99999"], "argument --threads: 99999 threads: this process"),
        (["serve", "--threads", "99999"], "argument --threads: 99999 threads: this process may use"),
        # Triton's LLVM aborted the process
        (["bench", "resources", "--arch", "0"], "argument --arch: invalid choice: 0 (choose from 50, 52"),
        # an empty list took zero values: every case, every way, as if the option were not given
        (["bench", "resources", "--only"], "argument --only: expected at least one argument"),
        (["bench", "wan-decoder", "--ways"], "argument --ways: expected at least one argument"),
        # linprog found no weights (a negative margin) or was given a bound below zero: tracebacks
        (["bench", "speech-room", "--margin", "-1"], "argument --margin: '-1' is not a share of the speech"),
        (["bench", "speech-room", "--margin", "1.5"], "argument --margin: '1.5' is not a share"),
        (["bench", "speech-room", "--pause-allowance", "-5"], "argument --pause-allowance: '-5' is not"),
        # numpy's generator refused it with a traceback
        (["bench", "speech-room", "--seed", "-1"], "argument --seed: '-1' is not a seed"),
    ],
)
def test_an_option_no_run_can_measure_with_is_refused(argv, says, capsys):
    assert says in refused(capsys, *argv)


def test_a_peer_timeout_of_0_turns_it_off():
    from server.cli import peer_timeout

    assert peer_timeout("0") == 0 and peer_timeout("3") == 3  # (0: ICE's own consent checks only)


@pytest.mark.parametrize("zero", ["0", "0.0", "0.00", "0e0"])
def test_a_timeout_of_0_spelt_any_way_turns_it_off(zero):
    """`--model-timeout 0.00` was refused as "not a positive finite number" where 0 and 0.0 were taken."""
    from server.cli import model_timeout, peer_timeout

    assert model_timeout(zero) == 0 and peer_timeout(zero) == 0


@pytest.mark.parametrize("option", ["--model-timeout", "--peer-timeout"])
def test_a_negative_timeout_says_that_0_is_taken_too(option, capsys):
    assert f"argument {option}: '-1' is not 0 (" in refused(capsys, "serve", option, "-1")


@pytest.mark.parametrize(
    "argv, says",
    [
        # numpy's generators refused a negative seed with a traceback; torch took -1 as 2**64 - 1
        (
            ["generate", "--seed", "-1"],
            "argument --seed: '-1' is not a seed: give a whole number in [0, 2**31)",
        ),
        (["generate", "--seed", str(2**70)], "is not a seed"),  # torch: "Overflow when unpacking long long"
        (["data", "make", "--seed", "-5"], "argument --seed: '-5' is not a seed"),
        (["data", "preview", "--seed", "-5"], "argument --seed: '-5' is not a seed"),
        (["eval", "--model", "debug", "--seed", "-1"], "argument --seed: '-1' is not a seed"),
        # the tokenizer kept the first 128 tokens and dropped the rest without a word; the server's
        # API refuses a caption this long
        (["generate", "--text", "x" * 501], "argument --text: longer than 500 characters"),
        # bytes that are not UTF-8 on the command line (a surrogate for each): the tokenizer's TypeError
        (["generate", "--text", "smiling \udcff"], "argument --text: text holds a lone surrogate"),
    ],
)
def test_a_seed_or_caption_the_server_would_refuse_is_refused_by_the_commands(tmp_path, argv, says, capsys):
    assert says in refused(capsys, *argv, "--out", str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
