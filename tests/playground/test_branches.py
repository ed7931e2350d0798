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
