"""A dataset's folder given wrongly: said as what it is."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("inside", ["train", "latents/tiny-vae/train"])
def test_a_folder_inside_a_dataset_given_as_the_dataset_names_the_dataset(tmp_path, inside):
    """A split's folder (DATA/train, where the shards are) given as the dataset was told "no
    manifest.json; run `streamgen data make`", as if no dataset were there: a make into it would
    have made a second dataset inside the first."""
    from streamgen.data.manifest import load_manifest
    from streamgen.data.shards import DataError

    dataset = tmp_path / "world"
    (dataset / inside).mkdir(parents=True)
    (dataset / "manifest.json").write_text("{}")
    with pytest.raises(DataError) as refused:
        load_manifest(dataset / inside)
    assert str(refused.value) == (
        f"{dataset / inside} is not a finished dataset: it is a folder inside the dataset {dataset}; give the "
        f"dataset's own folder, {dataset} (a split is chosen apart)"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(DataError, match=r"\(no manifest.json\); run `streamgen data make`$"):
        load_manifest(elsewhere)
