"""The chat tree: edits and regenerations add siblings, the visible path follows the active children, and no
message is ever dropped."""
from playground.tabs import branches as b


def contents(tree):
    return [m["content"] for m in b.messages(tree)]


def test_regenerate_and_edit_keep_every_branch():
    tree = b.from_messages([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}])
    b.branch(tree, 3, b.node("assistant", "a2'"))          # Regenerate the last reply
    assert contents(tree) == ["q1", "a1", "q2", "a2'"] and b.siblings(tree, 3) == (2, 2)
    b.branch(tree, 0, b.node("user", "q1 edited"))          # edit the first question: a new branch from the root
    b.append(tree, b.node("assistant", "a1'"))
    assert contents(tree) == ["q1 edited", "a1'"] and b.siblings(tree, 0) == (2, 2)
    b.move(tree, 0, -1)                                      # back to the old branch, with all that followed it
    assert contents(tree) == ["q1", "a1", "q2", "a2'"]
    b.move(tree, 3, -1)
    assert contents(tree) == ["q1", "a1", "q2", "a2"]
    b.move(tree, 3, -1)                                      # clamped at the first sibling
    assert b.siblings(tree, 3) == (1, 2)
    assert b.count(tree) == 7                                # q1 a1 q2 a2 a2' + q1-edited a1'


def test_a_chat_exported_and_imported_keeps_every_branch(tmp_path):
    import pytest
    from gradio import Error

    from playground.tabs import chat_files

    tree = b.from_messages([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}])
    b.branch(tree, 1, b.node("assistant", "a1'"))
    text = chat_files.to_json(tree, "Be brief.", {"temperature": 0.7}, "tiny")
    path = tmp_path / "chat.json"
    path.write_text(text)
    again, system = chat_files.from_json(chat_files.read_upload(str(path)))
    assert again == tree and system == "Be brief."
    import json
    data = json.loads(text)
    assert data["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                                {"role": "assistant", "content": "a1'"}]
    assert "**Assistant:**\n\na1'" in chat_files.to_markdown(tree, "")
    plain, _ = chat_files.from_json(json.dumps({"messages": data["messages"]}))  # any OpenAI-shaped messages
    assert b.messages(plain) == data["messages"][1:]
    with pytest.raises(Error, match="role"):
        chat_files.from_json(json.dumps({"tree": {"children": [{"role": "system", "content": "x"}]}}))
