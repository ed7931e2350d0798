"""A chat as a tree of messages, so that nothing is ever lost: editing a user message or regenerating a reply adds
a sibling beside the old one, and the visible conversation is the path through each node's active child.

Plain dicts (JSON as they are, for a per-session gr.State and the chat export):
    node = {"role": "user" | "assistant" | "root", "content": str, "children": [node, ...], "active": int}
Positions are indices into the visible path (the Chatbot's message indices), 0 = the first message.

Every operation is linear in the messages (none walks the path once per message) and none recurses, so a long
chat neither takes quadratic time nor hits Python's recursion limit (copy.deepcopy of a 400-message chat did).
`check_size` caps the messages of a chat (every branch), each counted at least `chat_message_chars` characters
against the prompt cap, so a flood of empty messages is refused like a long text.
"""
from __future__ import annotations

from backend import limits


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
    """A one-branch tree of `msgs` ({role, content: str}), built in one pass."""
    tree = new_tree()
    last = tree
    for m in msgs:
        last["children"].append(node(m["role"], m["content"]))
        last["active"] = len(last["children"]) - 1
        last = last["children"][-1]
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


def nodes(tree: dict):
    """Every node below the root, every branch, depth first; without recursion."""
    stack = list(reversed(tree["children"]))
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n["children"]))


def count(tree: dict) -> int:
    """Messages in the whole tree, every branch."""
    return sum(1 for _ in nodes(tree))


def copy_tree(tree: dict) -> dict:
    """A deep copy of the tree (copy.deepcopy recurses ~3 frames per message and fails past ~300), without
    recursion."""
    top = {**tree, "children": []}
    stack = [(tree, top)]
    while stack:
        old, new = stack.pop()
        for child in old["children"]:
            copied = {**child, "children": []}
            new["children"].append(copied)
            stack.append((child, copied))
    return top


def message_cost(content: str) -> int:
    """What one message counts against the prompt's character cap: its text, and at least a fixed overhead (the
    template's role markers and the work each message costs), so empty messages are not free."""
    return len(content) + limits.current().chat_message_chars


def check_size(n_messages: int) -> None:
    """Refuse a chat of more messages (every branch) than the deployment allows, before anything is built."""
    limits.check(n_messages, limits.current().max_chat_messages, "the number of messages in the chat (every branch)")
