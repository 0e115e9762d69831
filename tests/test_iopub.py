"""The publisher batches: a display updated several times in one batch is sent once, in its last state."""

from __future__ import annotations

import copy

from polycell.iopub import _coalesce_display_updates


def _display(msg_type: str, display_id: str, text: str) -> dict:
    return {
        "msg_type": msg_type,
        "content": {"data": {"text/plain": text}, "metadata": {}, "transient": {"display_id": display_id}},
    }


CELL_A, CELL_B = {"msg_id": "a"}, {"msg_id": "b"}
STREAM = {"msg_type": "stream", "content": {"name": "stdout", "text": "x\n"}}


def test_updates_of_one_display_in_a_batch_go_out_once_in_their_last_state():
    items = [
        (1, CELL_A, _display("display_data", "h", "pending"), None, 0),
        (1, CELL_A, _display("update_display_data", "h", "running"), None, 1),
        (1, CELL_A, STREAM, None, 2),
        (1, CELL_A, _display("update_display_data", "h", "done"), None, 9),
    ]
    before = copy.deepcopy(items)
    out = _coalesce_display_updates(items)
    assert [(item[2]["msg_type"], item[2]["content"].get("data")) for item in out] == [
        ("display_data", {"text/plain": "pending"}),
        ("update_display_data", {"text/plain": "done"}),
        ("stream", None),
    ]
    assert out[1][2]["content"]["transient"] == {"display_id": "h"}
    # At the last update's journal position: a page that replayed up to it already has its data.
    assert [item[4] for item in out] == [0, 9, 2]
    assert items == before  # journal records are shared: never changed in place


def test_displays_other_cells_and_end_markers_are_left_alone():
    end = (1, CELL_A, None, lambda: None, None)
    items = [
        (1, CELL_A, _display("display_data", "h", "a"), None, None),
        (1, CELL_A, _display("display_data", "h", "b"), None, None),  # dh.display() twice
        (2, CELL_A, _display("update_display_data", "other", "x"), None, None),
        end,
        (1, CELL_A, _display("update_display_data", "h", "c"), None, None),  # refreshes both: kept
        (1, CELL_B, _display("update_display_data", "h", "d"), None, None),  # another cell's: kept
    ]
    out = _coalesce_display_updates(items)
    assert out == items
