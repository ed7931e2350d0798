"""A chat as a tree of messages, so that nothing is ever lost: editing a user message or regenerating a reply adds
a sibling beside the old one, and the visible conversation is the path through each node's active child.

Plain dicts (JSON as they are, for a per-session gr.State and the chat export):
    node = {"role": "user" | "assistant" | "root", "content": str, "children": [node, ...], "active": int}
Positions are indices into the visible path (the Chatbot's message indices), 0 = the first message.
"""
from __future__ import annotations


def node(role: str, content: str) -> dict:
    return {"role": role, "content": content, "children": [], "active": 0}


def new_tree() -> dict:
    return node("root", "")


def path(tree: dict) -> list[dict]:
    """The visible conversation: from the root, each node's active child."""
    out, at = [], tree
    while at["children"]:
        at = at["children"][min(at["active"], len(at["children"]) - 1)]
        out.append(at)
    return out


def messages(tree: dict) -> list[dict]:
    return [{"role": n["role"], "content": n["content"]} for n in path(tree)]


def from_messages(msgs: list[dict]) -> dict:
    """A one-branch tree of `msgs` ({role, content: str})."""
    tree = new_tree()
    for m in msgs:
        append(tree, node(m["role"], m["content"]))
    return tree


def parent(tree: dict, i: int) -> dict:
    return tree if i == 0 else path(tree)[i - 1]


def append(tree: dict, child: dict) -> dict:
    """Add `child` after the last visible message and show it."""
    last = (path(tree) or [tree])[-1]
    last["children"].append(child)
    last["active"] = len(last["children"]) - 1
    return child


def branch(tree: dict, i: int, sibling: dict) -> dict:
    """Add `sibling` beside the message at position i (the old one and all that follows it stay) and show it."""
    up = parent(tree, i)
    up["children"].append(sibling)
    up["active"] = len(up["children"]) - 1
    return sibling


def siblings(tree: dict, i: int) -> tuple[int, int]:
    """(n, m): the message at position i is the n-th of m siblings."""
    up = parent(tree, i)
    return min(up["active"], len(up["children"]) - 1) + 1, len(up["children"])


def move(tree: dict, i: int, step: int) -> None:
    """Show the previous (step -1) or next (+1) sibling of the message at position i, clamped at the ends."""
    up = parent(tree, i)
    up["active"] = max(0, min(len(up["children"]) - 1, up["active"] + step))


def count(tree: dict) -> int:
    """Messages in the whole tree, every branch."""
    return sum(1 + count(c) for c in tree["children"])
