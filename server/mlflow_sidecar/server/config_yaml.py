"""Keys a YAML config file gives twice: YAML keeps the last one without a word, so a
section written twice (`server:` near the top and again further down) lost every key of
its first block."""

from __future__ import annotations

from typing import Any


def repeated_key(text: str) -> str | None:
    """The first key `text` gives twice in one mapping, as `section.key (lines 2 and 9)`,
    or None. Text that is not YAML is left to the settings' own reading to report."""
    import yaml  # only with a config file: a client-only install has no PyYAML

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    return _repeated_in(root, ())


def _repeated_in(node: Any, path: tuple[str, ...]) -> str | None:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        *parents, last = path or ("",)
        for index, item in enumerate(node.value):
            found = _repeated_in(item, (*parents, f"{last}[{index}]"))
            if found:
                return found
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in first_line:
            return f"{'.'.join((*path, key))} (lines {first_line[key]} and {line})"
        first_line[key] = line
        found = _repeated_in(value_node, (*path, key))
        if found:
            return found
    return None
