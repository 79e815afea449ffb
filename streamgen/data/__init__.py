"""The avatar world: synthetic talking-head clips (faces, speech, captions) made from a seed."""

SPLITS = ("train", "val", "test")  # every clip, identity and sentence belongs to one
