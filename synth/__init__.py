"""TextBind data synthesis (paper section 3) and the on-disk conversation schema.

Imports without Lightning: the pipeline runs on machines that never train.
"""

from synth.moved_modules import install as _install_moved_modules

_install_moved_modules()

from synth.data.conversation_io import ReadReport, iter_conversations, read_conversations, write_conversations
from synth.data.schema import IMAGE_PLACEHOLDER, Conversation, Location, SchemaError, Turn, validate

__all__ = [
    "IMAGE_PLACEHOLDER", "Conversation", "Location", "ReadReport", "SchemaError", "Turn",
    "iter_conversations", "read_conversations", "validate", "write_conversations",
]
