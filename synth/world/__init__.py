"""A procedural world with known answers: pictures of shapes whose every attribute is recorded, captions
about them in the style of CC3M, and conversations whose answers can be checked.

Nothing in this field offers a small world in which the whole TextBind pipeline learns on a CPU and every
metric has a known good value; this is that world. :mod:`synth.world.scenes` samples and renders
pictures (deterministic from a seed, any number, a held-out split of colour-shape combinations that no
training picture or text contains, a share of deliberately mismatched captions); ``synth ingest`` reads
them as the ``world`` source; :mod:`synth.world.dialogues` writes multi-turn, multi-image conversations
with their answers stored beside them.
"""

from synth.world.scenes import (COLOURS, HELD_OUT_PAIRS, SHAPES, Scene, WorldObject, caption, is_held_out,
                                render, sample_scene, world_pairs)

__all__ = ["COLOURS", "HELD_OUT_PAIRS", "SHAPES", "Scene", "WorldObject", "caption", "is_held_out", "render",
           "sample_scene", "world_pairs"]
