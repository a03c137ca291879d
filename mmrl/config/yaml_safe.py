"""A defensive YAML reader for configs: PyYAML's safe loader with an alias expansion budget,
duplicate keys refused, and the scientific float forms people write (``1e-4``).

Errors are ``yaml.YAMLError`` subclasses; :mod:`mmrl.config.core` turns them into ``ConfigError``.
"""
from __future__ import annotations

import re
import reprlib
from typing import Any, Dict, List

import yaml

MAX_ALIAS_NODES = 10_000
"""Most YAML nodes that aliases (``*name``) may add to a config when expanded; a real config adds
a few hundred at most, a 360-byte alias bomb billions."""


class AliasBudgetError(yaml.YAMLError):
    """Aliases that expand past the budget, or an alias inside its own anchor (a cycle)."""


def _where(event) -> str:
    return f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}"


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with an alias expansion budget.

    Each alias adds the expanded size of its target (nodes, counted once per node with a memo, so
    the count itself is linear in the composed nodes) to a running total; past
    ``alias_budget`` composing stops. An alias to a node still being composed (its own ancestor)
    would make a cyclic value and is refused too. PyYAML (YAML 1.1) reads "1e-4" as a string;
    the resolver below accepts the scientific forms people write.
    """

    alias_budget = MAX_ALIAS_NODES

    def __init__(self, stream):
        super().__init__(stream)
        self._expanded = 0
        self._sizes: Dict[int, int] = {}
        self._open: List[Any] = []  # the nodes being composed: ancestors of the current one

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._expanded += self._size(target, event, parent)
                if self._expanded > self.alias_budget:
                    raise AliasBudgetError(
                        f"aliases expand to more than {self.alias_budget} nodes (the limit "
                        f"mmrl.config.core.MAX_ALIAS_NODES; at *{event.anchor}, {_where(event)}); a "
                        f"config needs far fewer: write the values out or use fewer aliases")
        self._open.append(parent)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.pop()

    def _size(self, node, event, parent) -> int:
        """Nodes in ``node`` with every alias expanded (memoized on finished nodes)."""
        open_ids = {id(n) for n in self._open + [parent] if n is not None}
        stack, order, seen = [node], [], set()
        while stack:  # iterative: a deep document must not hit the recursion limit here
            n = stack.pop()
            if id(n) in open_ids:
                raise AliasBudgetError(f"alias *{event.anchor} ({_where(event)}) refers to a "
                                       f"node that contains it (a cycle); a config value must "
                                       f"be finite")
            if id(n) not in self._sizes and id(n) not in seen:
                seen.add(id(n))
                order.append(n)
                stack.extend(_children(n))
        for n in reversed(order):  # children before parents
            self._sizes[id(n)] = 1 + sum(self._sizes[id(k)] for k in _children(n))
        return self._sizes[id(node)]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names one key twice (YAML keeps the last silently; mmrl refuses)."""


def _refuse_duplicate_keys(loader, node, deep=False):
    """SafeLoader's mapping constructor, refusing a key written twice in one mapping.

    A config with ``lr: 1e-4`` and, further down the same section, ``lr: 1e-3`` would train with
    the second one while its author reads the first; merge keys (``<<: *base``) may still be
    overridden, which is what they are for.
    """
    if isinstance(node, yaml.MappingNode):
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first is not key_node:
                raise DuplicateKeyError(
                    f"key {reprlib.repr(key)} appears twice in one mapping (line "
                    f"{first.start_mark.line + 1} and {_where(key_node)}); YAML would keep the "
                    f"last silently: delete one of them")
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _construct_map(loader, node):
    data: Dict[Any, Any] = {}
    yield data  # the two-step form PyYAML uses, so anchors to this mapping resolve
    data.update(_refuse_duplicate_keys(loader, node))


Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else []


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|"
               r"^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))
