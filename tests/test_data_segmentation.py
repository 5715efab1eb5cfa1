"""Segmentation iterators on the shared position stream: broken pairs are substituted and counted
in training, not scored in evaluation, and a dataset of nothing but broken pairs stops."""

import os

import numpy as np
import pytest
from PIL import Image
from segmentation_data import write_voc

from vicregl_jax.data import PipelineError
from vicregl_jax.data import segmentation as seg_data


@pytest.fixture(scope="module")
def damaged_voc(tmp_path_factory):
    """A VOC-layout set whose train split has an undecodable image and a colour-coded mask, and
    whose val split has an undecodable image."""
    root = write_voc(str(tmp_path_factory.mktemp("voc")), train=12, aug=0, val=4, seed=1)
    train = seg_data.open_split(f"voc:{root}", "train")
    with open(train.images[3], "wb") as f:
        f.write(b"not a jpeg")
    height, width = np.asarray(Image.open(train.masks[7])).shape
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(train.masks[7])  # RGB: colours, not classes
    val = seg_data.open_split(f"voc:{root}", train=False)
    with open(val.images[1], "wb") as f:
        f.write(b"not a jpeg either")
    return root, train, val


def test_broken_training_pairs_are_replaced_counted_and_named(damaged_voc):
    _, train, _ = damaged_voc
    it = seg_data.make_train_iterator(train, global_batch_size=4, seed=0, scale=(64, 48), crop_size=(32, 32))
    batches = [next(it) for _ in range(3)]  # one epoch of the 12 pairs
    it.close()
    assert all(b["image"].shape == (4, 32, 32, 3) and np.isfinite(b["image"]).all() for b in batches)
    assert it.num_undecodable >= 2 and it.num_unreadable == 0 and it.stats()["step"] == 3
    named = {os.path.basename(name.split(" / ")[0]) for name in it.failed_examples}
    assert {os.path.basename(train.images[3]), os.path.basename(train.images[7])} <= named
    assert all(name.endswith("(undecodable)") for name in it.failed_examples)
    # Substitutes are drawn from the position: resuming is still a seek.
    resumed = seg_data.make_train_iterator(
        train, global_batch_size=4, seed=0, scale=(64, 48), crop_size=(32, 32), start_step=2
    )
    np.testing.assert_array_equal(next(resumed)["mask"], batches[2]["mask"])
    resumed.close()


def test_a_broken_evaluation_image_is_not_scored_and_counted(damaged_voc):
    _, _, val = damaged_voc
    sizes = [seg_data.image_size(path) for path in val.masks]
    chunks = seg_data.eval_chunks(sizes, scale=(64, 48), images_per_chunk=4, row_multiple=2)
    scored = []
    for chunk, batch in zip(chunks, seg_data.make_eval_iterator(val, chunks)):
        for k, index in enumerate(chunk.indices[: chunk.count]):
            scored.append((index, bool(batch["valid"][k])))
            if index == 1:  # the whole mask ignored, at the original size
                assert batch["mask"][k].shape == chunk.original_size and (batch["mask"][k] == 255).all()
    assert sorted(scored) == [(0, True), (1, False), (2, True), (3, True)]
    resized = seg_data.make_resized_iterator(val, image_size=32, global_batch_size=4)
    (batch,) = list(resized)
    np.testing.assert_array_equal(batch["valid"], [True, False, True, True])
    assert (batch["mask"][1] == 255).all() and resized.num_undecodable == 1


def test_a_split_of_nothing_but_broken_pairs_stops_with_the_files(tmp_path):
    root = write_voc(str(tmp_path), train=4, aug=0, val=2, seed=2)
    train = seg_data.open_split(f"voc:{root}", "train")
    for path in train.images:
        with open(path, "wb") as f:
            f.write(b"broken")
    it = seg_data.make_train_iterator(train, global_batch_size=2, seed=0, scale=(64, 48), crop_size=(32, 32))
    with pytest.raises(PipelineError, match=r"all 8 images tried.*JPEGImages.*\.jpg / .*\.png \(undecodable\)"):
        next(it)
