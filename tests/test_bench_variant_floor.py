"""Each `bench gpu` variant against its own configuration's floor (bench/variant_floor.py),
counted as bench/floor.py counts, on this CPU with `bench gpu --quick`'s tiny model."""

import json

import pytest

from bench import floor, gpu, variant_floor

pytestmark = pytest.mark.slow  # counting five configurations of the tiny model: ~20 s

# rates under which the tiny model's products, not its reads, set its floor (at --quick's 32x48 a
# matrix rate of 0.5 left it bound by the weights' reads: FP8 attention moved no floor there)
MATMUL, COPY, FP8 = 0.05, 20.0, 0.1
CEILINGS = {"matmul_tflop_per_s": MATMUL, "copy_gb_per_s": COPY, "matmul_tflop_per_s_float8": FP8}


@pytest.fixture(scope="module")
def counts():
    return variant_floor.count_configurations(quick=True)


@pytest.mark.parametrize(
    "variant, counted",
    [
        (dict(fp8_layers=24, decoder_way="tiny_decoder", cache_from="last_step"),
         dict(fp8_linears=True, decoder="tiny", cache_from="last_step")),
        (dict(decoder_way="chunk_per_call+upsample_phases", cache_from="last_step"),
         dict(decoder="upsample_phases", cache_from="last_step")),
        (dict(steps=2), dict(steps=2)),
    ],
    ids=["fp8-tiny-last_step", "upsample_phases-last_step", "2_steps"],
)  # fmt: skip
def test_a_variants_work_is_the_count_of_its_own_configuration(counts, variant, counted):
    # each stage from the configuration that changes it: the same numbers as counting the whole
    composed = variant_floor.variant_work(counts, {"fps_steady": 1.0, **variant}, steps=4)
    assert json.dumps(composed) == json.dumps(_counted(counts, **counted))


@pytest.mark.parametrize("name", ["tiny_decoder", "upsample_phases"])
def test_a_decoders_configuration_is_the_defaults_count_with_its_own_decodes(counts, name):
    # counted after the default, the transformer's work is taken from it and only the decoder runs
    # again, on the default's latents: the same numbers as counting the configuration whole
    assert json.dumps(counts[name]) == json.dumps(variant_floor.counted_work(True, **variant_floor.CONFIGURATIONS[name]))
    assert counts[name]["steady_chunk"]["stages"]["decode"] != counts["default"]["steady_chunk"]["stages"]["decode"]


def test_a_decoders_decodes_replace_the_first_chunks_too_where_it_is_a_copy(counts):
    # on the meta device the default's count is extrapolated: its first chunk a copy of the clip's
    # first, not the same dict (the tiny decoder's first chunk kept the Wan decoder's 28.8 TFLOP)
    decodes = floor.KeptDecodes()
    default = json.loads(json.dumps(variant_floor.counted_work(True, decodes=decodes)))
    assert default["first_chunk"] is not default["clip"][0]
    tiny = decodes.decoded_by(variant_floor.decoder_model(True, "tiny").vae)
    assert json.dumps(variant_floor.with_decodes(default, tiny)) == json.dumps(counts["tiny_decoder"])


def _counted(counts, **configuration) -> dict:
    """`variant_floor.counted_work(True, **configuration)`: the fixture's count where it counted that
    configuration already (the same call), else a count of its own."""
    for name, differs in variant_floor.CONFIGURATIONS.items():
        if differs == configuration:
            return counts[name]
    return variant_floor.counted_work(True, **configuration)


def test_fp8_attention_moves_the_variants_attention_as_the_floor_does(counts):
    composed = variant_floor.variant_work(counts, {"fps_steady": 1.0, "attention": "fp8"}, steps=4)
    moved = floor.attention_in_fp8(json.loads(json.dumps(counts["default"])), "fp8")
    assert (
        composed == moved and composed["steady_chunk"]["stages"]["denoise"]["tflop_by_kind"]["attention"] == 0
    )


def test_what_the_counts_cannot_say_gets_no_floor(counts):
    assert (
        variant_floor.variant_work({"default": counts["default"]}, {"decoder_way": "tiny_decoder"}, 4) is None
    )
    assert variant_floor.variant_work(counts, {"steps": 2, "fp8_layers": 24}, 4) is None
    assert variant_floor.own_ceilings(counts, {"fps_steady": 1.0}, {"error": "no FP8 here"}, 4) == {}


def test_each_variant_is_set_against_its_own_floor(counts):
    """Against the default configuration's floor, a variant that does other work came out as far
    from its floor as the default's rate allows, not its own: the tiny decoder, the last step's
    cache, FP8 products at twice the rate."""
    default = floor.rounded(floor.floor(counts["default"], MATMUL, COPY, fp8_tflops=FP8))
    stages = {
        "floor": default,
        "fps_ceiling": default["steady_chunk"]["fps_ceiling"],
        "clip_fps_ceiling": default["clip"]["fps_ceiling"],
    }
    levers = {
        "sdpa+fused_kernels": {},
        "triton+fused_kernels": {"attention": "triton"},  # the same products
        "tiny decoder": {"decoder_way": "tiny_decoder"},
        "fp8 linears": {"fp8_layers": 24},
        "fp8 attention": {"attention": "fp8"},
        "cache from last step": {"cache_from": "last_step"},
        "2 steps": {"steps": 2},
    }
    result = {"steps": 4, "stages": stages, "variants": {}}
    for name, lever in levers.items():
        variant = {"fps_steady": 10.0, "fps_clip": 12.0, "first_chunk_ms": 500.0, **lever}
        variant.update(variant_floor.own_ceilings(counts, variant, CEILINGS, 4))
        result["variants"][name] = variant
    gpu.summarize(result)
    for name, lever in levers.items():
        variant = result["variants"][name]
        work = variant_floor.variant_work(counts, variant, 4)
        own = floor.floor(work, MATMUL, COPY, fp8_tflops=FP8)
        assert variant["of_floor"] == pytest.approx(10.0 / own["steady_chunk"]["fps_ceiling"], rel=1e-3)
        assert variant["of_clip_floor"] == pytest.approx(12.0 / own["clip"]["fps_ceiling"], rel=1e-3)
        same = variant["fps_ceiling"] == pytest.approx(stages["fps_ceiling"], rel=1e-3)
        assert same == (lever.get("attention", "sdpa") == "triton" or not lever), name
    # without counts: the default's floor for what does the default's work, none for the rest
    bare = {
        "steps": 4,
        "stages": stages,
        "variants": {n: {"fps_steady": 10.0, **lever} for n, lever in levers.items()},
    }
    gpu.summarize(bare)
    assert {n for n, v in bare["variants"].items() if "of_floor" in v} == {
        "sdpa+fused_kernels",
        "triton+fused_kernels",
    }


def test_counts_for_a_run_must_be_of_its_model_and_steps(tmp_path, counts):
    path = tmp_path / "work.json"
    path.write_text(json.dumps({"quick": True, "steps": 4, "counts": counts}))
    read, source = variant_floor.counts_for_run(str(path), quick=True, steps=4)
    assert read == json.loads(json.dumps(counts)) and source.startswith(str(path))
    assert variant_floor.counts_for_run(str(path), quick=False, steps=4)[0] is None  # the tiny model's
    missing, source = variant_floor.counts_for_run(str(tmp_path / "none.json"), quick=False, steps=4)
    assert missing is None and "unreadable" in source
    assert variant_floor.counts_for_run(None, quick=False, steps=4)[0] is None  # counting takes a minute
