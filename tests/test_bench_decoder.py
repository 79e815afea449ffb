"""`streamgen bench decoder`'s refusals."""


def test_a_decoder_of_other_latents_is_refused_in_one_line(capsys):
    # --against a model whose decoder takes other latents was a SystemExit: exit 1, the line
    # without the command's name
    from streamgen.cli import main

    argv = ["bench", "decoder", "--json", "--model", "debug", "--against", "tiny-avatar", "--sizes", "32"]
    assert main(argv) == 2
    (line,) = [x for x in capsys.readouterr().err.strip().splitlines() if "no trained weights" not in x]
    assert line.startswith(
        "streamgen bench: error: --against tiny-avatar: its decoder takes 16 latent channels"
    )
