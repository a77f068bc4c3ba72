"""An entity's bulk: what an answer leaves out when the whole entity would not fit one message.

An answer that must go out whatever its size (a call whose change has taken effect, a
DownloadModel manifest) carries its entity without the parts that can grow without bound
(tags, params, aliases, ...), part after part, until it fits: the entity's identity and
state always come whole; the caller reads the rest with a Get call.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

# Per entity message: its bulk, in the order an answer leaves it out.
ENTITY_BULK: Mapping[str, tuple[str, ...]] = {
    "Run": ("data", "inputs", "outputs"),
    "Experiment": ("tags",),
    "LoggedModel": ("tags", "params"),
    "RegisteredModel": ("tags", "aliases"),
    "ModelVersion": ("tags", "aliases", "description"),
}


def leave_out_bulk(message: Message, limit: int) -> list[str]:
    """Clear the bulk of each entity `message` holds (as a field of its own), part after
    part in `ENTITY_BULK`'s order, until `message` is at most `limit` bytes or no bulk is
    left. Returns the parts cleared, spelled `field.part` (`run.data`)."""
    cleared: list[str] = []
    entities = [
        (field.name, entity)
        for field, entity in message.ListFields()
        if isinstance(entity, Message) and entity.DESCRIPTOR.name in ENTITY_BULK
    ]
    for name, entity in entities:
        for part in ENTITY_BULK[entity.DESCRIPTOR.name]:
            if message.ByteSize() <= limit:
                return cleared
            size = entity.ByteSize()
            entity.ClearField(part)
            if entity.ByteSize() != size:
                cleared.append(f"{name}.{part}")
    return cleared
