"""YAML for recipes: yaml's SafeLoader, refusing anchors and aliases (a few hundred bytes of
nested aliases expand into megabytes: the "billion laughs"), keys given twice in one mapping
(YAML keeps the last one silently), and nesting deep enough to exhaust the parser's stack."""

from __future__ import annotations

from typing import Any

import yaml

from attnc.errors import RecipeError


class _Refused(yaml.YAMLError):
    pass


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases (and so merge keys of aliases) or duplicate keys."""

    def compose_node(self, parent, index):  # noqa: ANN001 - yaml's signature
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"line {line}: YAML aliases (*{event.anchor}) are not allowed")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(f"line {line}: YAML anchors (&{anchor}) are not allowed")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - yaml's signature
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # SafeConstructor names unhashable keys itself
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _Refused(
                        f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in "
                        "one mapping"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document of a recipe; every failure is one RecipeError line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise RecipeError(f"{source}: {exc}", "write the values out in full") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())[:200]
        raise RecipeError(f"{source} is not valid YAML: {first}") from None
    except RecursionError:
        raise RecipeError(f"{source} is not valid YAML: nested too deeply") from None
