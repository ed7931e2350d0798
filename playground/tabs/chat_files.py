"""Chats in and out: JSON with every branch (the tree of tabs/branches.py, whose nodes are OpenAI-shaped
{role, content} messages with their children), the visible branch as OpenAI `messages`, the parameters and the model
id; upload one to continue it. And the visible branch as plain Markdown."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from backend.disk import caches as cache_dir
from backend import limits

from .. import deployment
from ..errors import refusal
from . import branches

FORMAT = "fornax-chat/1"
MAX_NODES = 20_000
ROLES = {"user", "assistant"}


def to_json(tree: dict, system_prompt: str, parameters: dict, model: str | None) -> str:
    visible = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + branches.messages(tree)
    return json.dumps({"format": FORMAT, "model": model, "system_prompt": system_prompt or "",
                       "parameters": parameters, "messages": visible, "tree": tree}, ensure_ascii=False, indent=1)


def to_markdown(tree: dict, system_prompt: str) -> str:
    parts = [f"**System:** {system_prompt}"] if system_prompt else []
    for m in branches.messages(tree):
        parts.append(f"**{'You' if m['role'] == 'user' else 'Assistant'}:**\n\n{m['content']}")
    return "\n\n---\n\n".join(parts) + "\n"


def checked_tree(raw) -> dict:
    """A tree from an uploaded file, rebuilt node by node: only the fields we know, every one checked."""
    budget = [MAX_NODES]

    def walk(n, root=False) -> dict:
        if not isinstance(n, dict) or not isinstance(n.get("children", []), list):
            raise refusal("the chat file's tree is malformed")
        budget[0] -= 1
        if budget[0] < 0:
            raise refusal(f"the chat file has more than {MAX_NODES:,} messages")
        role, content = n.get("role"), n.get("content", "")
        if not root and (role not in ROLES or not isinstance(content, str)):
            raise refusal("each message in the chat file needs a role (user or assistant) and text content")
        children = [walk(c) for c in n.get("children", [])]
        active = n.get("active", 0)
        active = active if isinstance(active, int) and 0 <= active < max(1, len(children)) else 0
        return {"role": "root" if root else role, "content": "" if root else content, "children": children,
                "active": active}

    return walk(raw, root=True)


def from_json(text: str) -> tuple[dict, str]:
    """(tree, system prompt) of an exported chat, or of any JSON holding OpenAI `messages`."""
    try:
        data = json.loads(text)
    except ValueError:
        raise refusal("the chat file is not JSON") from None
    if not isinstance(data, dict):
        raise refusal("the chat file must hold a JSON object with messages")
    messages = data.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise refusal("the chat file's messages must be a list of {role, content}")
    system = data.get("system_prompt")
    if not isinstance(system, str):
        system = next((m.get("content") for m in messages if m.get("role") == "system"), "") or ""
    if "tree" in data:
        tree = checked_tree(data["tree"])
    else:
        tree = checked_tree(branches.from_messages([m for m in messages if m.get("role") != "system"]))
    return tree, str(system)


def read_upload(path: str) -> str:
    deployment.check_upload(path, "the chat file")
    cap = limits.current().max_prompt_chars * 8  # every branch, each within the prompt cap, with JSON around it
    if os.path.getsize(path) > cap:
        raise refusal(f"the chat file is over {cap:,} bytes")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


MAX_CHAT_EXPORTS = 200          # chat downloads kept at once (Gradio serves its own copy of each)
CHAT_EXPORT_TTL_S = 600.0


def write(text: str, name: str) -> str:
    """The chat as a file to download, in the capped "chats" area (backend/disk/caches.py): exports older than
    CHAT_EXPORT_TTL_S, or beyond the newest MAX_CHAT_EXPORTS, are removed first."""
    root = cache_dir.areas()["chats"]
    root.mkdir(parents=True, exist_ok=True)
    sweep_exports(root)
    folder = tempfile.mkdtemp(prefix="chat-", dir=root)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    cache_dir.evict(keep=(folder,))
    return path


def sweep_exports(root) -> None:
    now, found = time.time(), []
    for p in root.iterdir():
        try:
            found.append((p.stat().st_mtime, p))
        except OSError:  # swept by a concurrent export
            continue
    found.sort()
    for i, (mtime, p) in enumerate(found):
        if now - mtime > CHAT_EXPORT_TTL_S or i < len(found) - (MAX_CHAT_EXPORTS - 1):
            shutil.rmtree(p, ignore_errors=True)
